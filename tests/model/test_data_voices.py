"""Random espeak-ng speakers: seeded variant files, a private data directory, real synthesis."""

import subprocess

import numpy as np
import pytest

from model.data import digits, load_dataset, voices
from model.data.speech import Utterance, read_wav, synthesize


def _fields(text: str) -> dict[str, list[list[str]]]:
    fields: dict[str, list[list[str]]] = {}
    for line in text.splitlines():
        key, *values = line.split()
        fields.setdefault(key, []).append(values)
    return fields


def test_variant_files_are_seeded_by_name_and_stay_in_range():
    names = [voices.name(i) for i in range(200)]
    texts = [voices.variant_text(n) for n in names]
    assert texts == [voices.variant_text(n) for n in names]
    assert len(set(texts)) == len(texts)
    klatt_modes, tones = set(), 0
    for name, text in zip(names, texts, strict=True):
        fields = _fields(text)
        assert fields["name"] == [[name]]
        assert len(fields["formant"]) == 9
        for _index, frequency, height, width in fields["formant"]:
            assert 55 <= int(frequency) <= 160 and 30 <= int(height) <= 120
            assert 50 <= int(width) <= 200
        low, high = map(int, fields["pitch"][0])
        assert 60 <= low < high
        klatt_modes.add(int(fields["klatt"][0][0]) if "klatt" in fields else 0)
        tones += "tone" in fields
    # Every mode the training speakers use is drawn; the held-out speakers' 4 and 5 never are.
    assert klatt_modes == set(voices.KLATT_MODES)
    assert 20 < tones < 120


def test_random_speakers_add_training_voices_only():
    stock = digits.plan("train", more_voices=True)
    drawn = digits.plan("train", more_voices=True, random_voices=30)
    assert digits.plan("test") == digits.plan("test", more_voices=True, random_voices=30)
    extra = [c for c in drawn if c.utterance.variant.startswith(voices.PREFIX)]
    assert len(drawn) == len(stock) + len(extra) and len(extra) == 30 * 10 * 2
    assert len({c.utterance.variant for c in extra}) == 30
    assert {c.utterance.accent for c in extra} == set(digits.TRAIN_ACCENTS)
    assert [c.target for c in drawn[:10]] == list(range(10))


def test_a_random_speaker_is_synthesised_with_its_own_variant(tmp_path):
    variant = voices.name(voices.GROUP + 7)  # the second group: its own data directory
    home = voices.private_data(tmp_path, variant)
    listed = sorted(p.name for p in (home / "espeak-ng-data" / "voices" / "!v").iterdir())
    assert listed == [voices.name(i) for i in range(voices.GROUP, 2 * voices.GROUP)]
    assert voices.private_data(tmp_path, voices.name(voices.GROUP)) == home
    assert voices.private_data(tmp_path, voices.name(0)) != home

    def render(voice_variant: str, data_path) -> bytes:
        utterance = Utterance("seven", "en-us", voice_variant, 170, 50, 80)
        path = synthesize(utterance, tmp_path / f"{voice_variant}.wav", 16000, data_path)
        samples, rate = read_wav(path)
        assert rate == 16000 and len(samples) > 2000 and abs(samples).max() > 0.05
        return samples.tobytes()

    drawn = render(variant, home)
    # espeak-ng falls back to the plain accent for a variant it cannot find: that must not be
    # what was heard.
    assert drawn != render("nosuchvariant", home)
    assert drawn != render("m3", None)


def test_a_mistyped_dataset_option_is_an_error():
    with pytest.raises(ValueError, match="no option 'random_voice'"):
        load_dataset("espeak-digits", random_voice=10)
    with pytest.raises(ValueError, match="no option 'cache_dir'"):
        load_dataset("basicmotions", cache_dir="/tmp")


def test_accented_speakers_are_the_plain_ones_with_sound_changes_drawn():
    changed = 0
    for index in range(300):
        plain = voices.variant_text(voices.name(index)).splitlines()
        accented = voices.variant_text(voices.name(index, accented=True)).splitlines()
        assert voices.accent_lines(voices.name(index)) == []
        # The same speaker (every line but its name), then its replacements.
        assert accented[0] == plain[0] and accented[2:len(plain)] == plain[2:]
        replaced = [line.split() for line in accented[len(plain):]]
        sources = [source for _key, _flags, source, _target in replaced]
        assert len(set(sources)) == len(sources)
        for key, flags, source, target in replaced:
            assert key == "replace" and (flags, target) in voices.ACCENT_PROCESSES[source]
        changed += len(replaced)
    expected = 300 * len(voices.ACCENT_PROCESSES) * voices.ACCENT_PROB
    assert 0.8 * expected < changed < 1.2 * expected


def test_an_accented_speaker_says_what_its_replacements_change(tmp_path):
    # The first accented speaker whose only change is a dental t: "two" must change, "seven"
    # (no t) must sound exactly as the plain speaker's.
    index = next(i for i in range(200)
                 if voices.accent_lines(voices.name(i, accented=True)) == ["replace 00 t t["])

    def render(word: str, variant: str) -> np.ndarray:
        utterance = Utterance(word, "en-us", variant, 170, 50, 80)
        path = synthesize(utterance, tmp_path / f"{variant}-{word}.wav", 16000,
                          voices.private_data(tmp_path, variant))
        return read_wav(path)[0]

    plain, accented = voices.name(index), voices.name(index, accented=True)
    assert np.array_equal(render("seven", accented), render("seven", plain))
    two, dental_two = render("two", plain), render("two", accented)
    length = min(len(two), len(dental_two))
    assert np.abs(two[:length] - dental_two[:length]).max() > 0.05


def test_accented_speakers_replace_plain_ones_in_training_only():
    plain = digits.plan("train", random_voices=20)
    accented = digits.plan("train", random_voices=20, accent_processes=True)
    assert digits.plan("test") == digits.plan("test", random_voices=20, accent_processes=True)
    drawn = [c.utterance.variant for c in accented
             if c.utterance.variant.startswith((voices.PREFIX, voices.ACCENTED))]
    assert len(set(drawn)) == 20 and all(v.startswith(voices.ACCENTED) for v in drawn)
    assert len(accented) == len(plain)


def test_a_final_glottal_stop_changes_only_a_word_final_t(tmp_path):
    # espeak-ng's replace flag 01: only at the end of a word.
    index = next(i for i in range(300)
                 if voices.accent_lines(voices.name(i, accented=True)) == ["replace 01 t ?"])
    variant = voices.name(index, accented=True)
    phonemes = subprocess.run(
        ["espeak-ng", f"--path={voices.private_data(tmp_path, variant)}", "-v",
         f"en-us+{variant}", "-q", "-x", "two eight"],
        check=True, capture_output=True, text=True).stdout.split()
    assert phonemes == ["t'u:", "'eI?"]
