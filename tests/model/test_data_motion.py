"""BasicMotions comes from the files bundled in the aeon wheel, with the documented shapes."""

import numpy as np

from model.data import load_dataset, motion


def test_bundled_files_are_read_offline():
    directory = motion.bundled_directory()
    assert (directory / "BasicMotions_TRAIN.ts").is_file()
    assert (directory / "BasicMotions_TEST.ts").is_file()


def test_shapes_labels_and_rate():
    data = load_dataset("basicmotions")
    assert data.labels == ["standing", "running", "walking", "badminton"]
    assert data.sample_rate == 10.0
    for split in (data.train, data.test):
        assert split.inputs.shape == (40, 100, 6)
        assert split.inputs.dtype == np.float32
        assert np.bincount(split.targets, minlength=4).tolist() == [10, 10, 10, 10]
        assert np.isfinite(split.inputs).all()
    # The archive's split: no test recording repeats a training one.
    train_rows = {row.tobytes() for row in data.train.inputs}
    assert not any(row.tobytes() in train_rows for row in data.test.inputs)


def test_limit_keeps_a_class_balanced_prefix():
    data = load_dataset("basicmotions", limit=8)
    assert len(data.train) == len(data.test) == 8
    assert np.bincount(data.train.targets, minlength=4).tolist() == [2, 2, 2, 2]
    full = load_dataset("basicmotions")
    np.testing.assert_array_equal(data.train.inputs, full.train.inputs[:8])


def test_describe_records_provenance():
    info = load_dataset("basicmotions").describe()
    assert info["dataset"] == "basicmotions"
    assert info["train_size"] == info["test_size"] == 40
    assert "aeon" in info["source"]


def test_test_split_is_offered_at_20_and_5_hz():
    data = load_dataset("basicmotions")
    fast, slow = data.extra_evaluations["test_20hz"], data.extra_evaluations["test_5hz"]
    assert (fast.rate, slow.rate) == (2.0, 0.5)
    assert fast.split.inputs.shape == (40, 200, 6) and slow.split.inputs.shape == (40, 50, 6)
    assert (fast.split.targets == data.test.targets).all()
    # every other 20 Hz sample lies on the original grid: resampling keeps the signal
    err = np.abs(fast.split.inputs[:, ::2] - data.test.inputs).mean()
    assert err < 0.1 * np.abs(data.test.inputs).mean()
