"""The decoder of a trained classifier fitted again, with the rest of the network frozen.

A pooled classifier's logits at the last sample are `decoder(mean over time of the last
block's outputs)`; training fits that linear map jointly with the SSM stack, and it can end up
fitted to the training voices. Here it is fitted again by L2-regularised logistic regression
on those pooled features, its strength C chosen by k-fold cross-validation on the training
split only, grouped by who made each item when the split knows (whole speakers held out, as
the test split does). The network's shape does not change, so neither do its streaming cost,
its state or any of its step paths.
"""

from __future__ import annotations

import numpy as np
import torch

from model.data.base import Split
from model.network import S4Network

C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


@torch.no_grad()
def pooled_features(net: S4Network, split: Split, batch_size: int = 64) -> np.ndarray:
    """(N, d_model) float64: the mean over time of the last block's outputs, what the
    decoder sees at each sequence's last sample."""
    parts = [net.features(torch.as_tensor(split.inputs[i:i + batch_size])).double().mean(1)
             for i in range(0, len(split), batch_size)]  # (B, d_model) each
    return torch.cat(parts).numpy()


def refit_decoder(net: S4Network, split: Split, c_grid: tuple[float, ...] = C_GRID,
                  folds: int = 5) -> dict:
    """Replace `net`'s decoder by the logistic regression picked by cross-validation on
    `split`; returns what was measured (accuracy per C, the C picked, how it was grouped)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    if not net.pooled or not isinstance(net.decoder, torch.nn.Linear):
        raise ValueError("only a pooled classifier's linear decoder can be refitted")
    x, y = pooled_features(net.eval(), split), split.targets  # (N, H), (N,)
    if split.groups is not None:
        parts = list(GroupKFold(folds).split(x, y, split.groups))
    else:
        parts = list(StratifiedKFold(folds, shuffle=True, random_state=0).split(x, y))

    def fitted(rows: np.ndarray, c: float):
        scale = StandardScaler().fit(x[rows])
        return scale, LogisticRegression(C=c, max_iter=5000).fit(scale.transform(x[rows]), y[rows])

    scores = {}
    for c in c_grid:
        hits = []
        for train_rows, held_out in parts:
            scale, model = fitted(train_rows, c)
            hits.append(model.score(scale.transform(x[held_out]), y[held_out]))
        scores[c] = float(np.mean(hits))
    best = max(scores, key=scores.get)
    scale, model = fitted(np.arange(len(y)), best)
    weight = model.coef_ / scale.scale_  # (d_output, H): the standardisation folded in
    bias = model.intercept_ - weight @ scale.mean_  # (d_output,)
    with torch.no_grad():
        net.decoder.weight.copy_(torch.as_tensor(weight, dtype=net.decoder.weight.dtype))
        net.decoder.bias.copy_(torch.as_tensor(bias, dtype=net.decoder.bias.dtype))
    return {"method": "logistic regression on the frozen pooled features, L2, C by "
                      f"{folds}-fold cross-validation on the training split",
            "grouped_by": "split groups (speaker)" if split.groups is not None else None,
            "cv_accuracy": {str(c): round(s, 4) for c, s in scores.items()}, "C": best}
