"""Simple reference classifiers on the same split and the same raw input as the S4 models.

They answer "how much does the sequence model add": 1-nearest-neighbour (Euclidean) and
multinomial logistic regression on the flattened raw samples, plus, for audio, logistic
regression on the log-magnitude spectrum of the whole clip (a hand-made, shift-invariant
feature the S4 model is not given). scikit-learn comes with aeon (the `train` extra).
"""

from __future__ import annotations

import numpy as np

from model.data.base import Dataset, Split


def _flat(split: Split) -> np.ndarray:
    return split.inputs.reshape(len(split), -1).astype(np.float64)


def _log_spectrum(split: Split) -> np.ndarray:
    """log(1 + |FFT|) per channel of the whole sequence: ignores where in the window a word sits."""
    magnitude = np.abs(np.fft.rfft(split.inputs, axis=1))  # (N, F, C)
    return np.log1p(magnitude).reshape(len(split), -1)


def nearest_neighbour_accuracy(train: np.ndarray, train_y: np.ndarray, test: np.ndarray,
                               test_y: np.ndarray) -> float:
    from sklearn.neighbors import KNeighborsClassifier

    model = KNeighborsClassifier(n_neighbors=1).fit(train, train_y)
    return float((model.predict(test) == test_y).mean())


def logistic_regression_accuracy(train: np.ndarray, train_y: np.ndarray, test: np.ndarray,
                                 test_y: np.ndarray, seed: int = 0) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    model.fit(train, train_y)
    return float((model.predict(test) == test_y).mean())


def evaluate_baselines(dataset: Dataset, seed: int = 0, spectrum: bool | None = None) -> dict:
    """Held-out accuracy of each baseline, keyed by name, with what it sees."""
    train, test = dataset.train, dataset.test
    x_train, x_test = _flat(train), _flat(test)
    results = {
        "nearest_neighbour_raw": {
            "accuracy": nearest_neighbour_accuracy(x_train, train.targets, x_test, test.targets),
            "what": "1-nearest neighbour, Euclidean distance on the raw samples",
        },
        "logistic_regression_raw": {
            "accuracy": logistic_regression_accuracy(
                x_train, train.targets, x_test, test.targets, seed
            ),
            "what": "standardised raw samples, multinomial logistic regression",
        },
    }
    if spectrum if spectrum is not None else train.inputs.shape[1] >= 1000:
        results["logistic_regression_log_spectrum"] = {
            "accuracy": logistic_regression_accuracy(
                _log_spectrum(train), train.targets, _log_spectrum(test), test.targets, seed
            ),
            "what": "log-magnitude spectrum of the whole clip (hand-made feature), logistic "
            "regression",
        }
    return results
