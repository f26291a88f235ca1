"""The espeak-ng digits: voice-disjoint plan, real synthesis with espeak-ng + sox, 8 kHz copy."""

import numpy as np
import pytest

from model.data import digits, load_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = tmp_path_factory.mktemp("digits-cache")
    return load_dataset("espeak-digits", limit=10, cache_dir=cache), cache


def test_train_and_test_voices_share_no_accent_or_variant():
    train, test = digits.plan("train"), digits.plan("test")
    train_accents = {c.utterance.accent for c in train}
    test_accents = {c.utterance.accent for c in test}
    train_variants = {c.utterance.variant for c in train}
    test_variants = {c.utterance.variant for c in test}
    assert not train_accents & test_accents
    assert not train_variants & test_variants
    assert len(train_variants) >= 20 and len(test_variants) >= 5


def test_more_voices_add_training_variants_only():
    wide, test = digits.plan("train", more_voices=True), digits.plan("test", more_voices=True)
    assert test == digits.plan("test")
    variants = {c.utterance.variant for c in wide}
    assert variants == set(digits.TRAIN_VARIANTS) | set(digits.EXTRA_TRAIN_VARIANTS)
    assert not variants & set(digits.TEST_VARIANTS)
    assert not {c.utterance.accent for c in wide} & {c.utterance.accent for c in test}
    assert len(wide) == 10 * len(digits.TRAIN_ACCENTS) * len(variants) * 2


def test_plan_is_deterministic_balanced_and_varied():
    first, second = digits.plan("train"), digits.plan("train")
    assert first == second
    assert len(first) == 10 * len(digits.TRAIN_ACCENTS) * len(digits.TRAIN_VARIANTS) * 2
    assert [c.target for c in first[:10]] == list(range(10))
    speeds = {c.utterance.speed_wpm for c in first}
    pitches = {c.utterance.pitch for c in first}
    assert len(speeds) > 20 and len(pitches) > 20
    assert all(digits.SPEED_WPM[0] <= s <= digits.SPEED_WPM[1] for s in speeds)


def test_generated_clips_hold_speech_in_a_one_second_window(tiny):
    data, _cache = tiny
    assert data.sample_rate == 16000.0
    assert data.labels == list(digits.WORDS)
    for split in (data.train, data.test):
        assert split.inputs.shape == (10, 16000, 1)
        assert split.targets.tolist() == list(range(10))
        peak = np.abs(split.inputs).max(axis=(1, 2))
        assert (peak > 0.05).all() and (peak <= 1.0).all()
        # The word is shorter than the window: some silence remains in every clip.
        silent = (np.abs(split.inputs[..., 0]) < 1e-4).mean(axis=1)
        assert (silent > 0.1).all()
    assert not np.array_equal(data.train.inputs, data.test.inputs)


def test_eight_khz_copy_is_the_same_audio_at_half_the_rate(tiny):
    data, _cache = tiny
    extra = data.extra_evaluations["test_8khz"]
    assert extra.rate == 0.5
    assert extra.split.inputs.shape == (10, 8000, 1)
    np.testing.assert_array_equal(extra.split.targets, data.test.targets)
    # Speech energy sits mostly below 4 kHz, so resampling keeps the loudness.
    rms_16k = np.sqrt((data.test.inputs**2).mean(axis=(1, 2)))
    rms_8k = np.sqrt((extra.split.inputs**2).mean(axis=(1, 2)))
    np.testing.assert_allclose(rms_8k, rms_16k, rtol=0.25)


def test_cache_is_reused(tiny):
    data, cache = tiny
    files = sorted(cache.rglob("*.wav"))
    assert len(files) == 30  # 10 train + 10 test at 16 kHz, 10 test at 8 kHz
    stamps = [f.stat().st_mtime_ns for f in files]
    again = load_dataset("espeak-digits", limit=10, cache_dir=cache)
    assert [f.stat().st_mtime_ns for f in files] == stamps
    np.testing.assert_array_equal(again.train.inputs, data.train.inputs)


def test_a_clip_made_again_elsewhere_is_the_same(tiny, tmp_path):
    # Every machine regenerates the held-out clips its accuracy is stored for: synthesis and
    # resampling must not add randomness (sox dithers unless told not to).
    data, _cache = tiny
    again = load_dataset("espeak-digits", limit=10, cache_dir=tmp_path / "elsewhere")
    np.testing.assert_array_equal(again.test.inputs, data.test.inputs)
    low, low_again = (d.extra_evaluations["test_8khz"].split for d in (data, again))
    np.testing.assert_array_equal(low_again.inputs, low.inputs)
