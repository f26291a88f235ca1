"""Spoken digits "zero".."nine" synthesised by espeak-ng: raw 16 kHz audio, voice-disjoint split.

A *voice* is an espeak-ng accent combined with a speaker variant (`en-us+m3`). Train and test
use disjoint accents *and* disjoint variants, so no test speaker timbre or accent is heard in
training. Each (voice, rendition) says all ten digits with its own speed, pitch and loudness
(drawn from a hash-seeded generator, so the set is the same on every machine). The trimmed word
is placed at a random onset inside a 1 s window of silence, like a keyword in a stream.

Nothing here runs at import: `load()` synthesises missing clips into a cache directory
(default ~/.cache/s4serve/digits, override with S4SERVE_CACHE or `cache_dir`) and reads them.
The test set is also offered at 8 kHz (sox-resampled from the 16 kHz clips) for the zero-shot
rate-change evaluation: a model trained at 16 kHz run with `rate=0.5`.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.data import voices
from model.data.base import Dataset, ExtraEvaluation, Split, seeded_generator
from model.data.speech import Utterance, read_wav, require_tools, resample, synthesize

NAME = "espeak-digits"
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SAMPLE_RATE_HZ = 16000
WINDOW_SECONDS = 1.0
LOW_RATE_HZ = 8000

TRAIN_ACCENTS = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-029")
TEST_ACCENTS = ("en-us-nyc", "en-gb-x-gbcwmd", "en-gb-x-gbclan")
TRAIN_VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "f1", "f2", "f3", "f4", "klatt", "klatt2", "klatt3",
    "adam", "Andy", "Annie", "aunty", "benjamin", "boris", "david", "grandpa", "john", "linda",
    "max", "paul", "quincy", "steph", "zac",
)  # fmt: skip
TEST_VARIANTS = ("m7", "f5", "klatt4", "edward", "Alex", "travis", "robert", "michel")
# `more_voices`: every other espeak-ng variant except those named like a test variant
# (m8, klatt5/6, edward2, rob, Michael) and the whispered, robotic or effect voices
EXTRA_TRAIN_VARIANTS = (
    "Alicia", "Andrea", "AnxiousAndy", "Denis", "Diogo", "Gene", "Gene2", "Henrique", "Hugo",
    "Jacky", "Lee", "Marco", "Mario", "Mike", "Nguyen", "RicishayMax", "Storm",
    "anika", "announcer", "antonio", "belinda", "caleb", "ed", "grandma", "gustave", "iven",
    "iven2", "iven3", "iven4", "kaukovalta", "marcelo", "miguel", "norbert", "pablo",
    "pedro", "sandro", "shelby", "steph2", "steph3", "victor",
)  # fmt: skip
SPEED_WPM = (130, 230)
PITCH = (20, 80)
AMPLITUDE = (30, 100)
DEFAULT_RENDITIONS = 2


@dataclass(frozen=True)
class Clip:
    """One item: what to say and where the word starts inside the 1 s window (in seconds)."""

    utterance: Utterance
    target: int
    onset_fraction: float


def _voices(accents: tuple[str, ...], variants: tuple[str, ...]) -> list[tuple[str, str]]:
    """All accent x variant pairs, ordered so that consecutive voices differ in both."""
    pairs = [
        (accents[i % len(accents)], variants[i % len(variants)])
        for i in range(len(accents) * len(variants))
    ]
    if len(set(pairs)) != len(pairs):  # gcd(A, V) > 1: fall back to the plain product
        pairs = [(accent, variant) for variant in variants for accent in accents]
    return pairs


def train_voices(more_voices: bool = False, random_voices: int = 0,
                 accent_processes: bool = False) -> list[tuple[str, str]]:
    """(accent, variant) of every training voice: the stock variants crossed with the training
    accents, then each random speaker (model/data/voices.py) with one training accent, with
    sound changes of real Englishes drawn too if `accent_processes`."""
    stock = _voices(TRAIN_ACCENTS, TRAIN_VARIANTS + (EXTRA_TRAIN_VARIANTS if more_voices else ()))
    drawn = [(TRAIN_ACCENTS[i % len(TRAIN_ACCENTS)], voices.name(i, accent_processes))
             for i in range(random_voices)]
    return stock + drawn


def plan(split: str, renditions: int = DEFAULT_RENDITIONS, more_voices: bool = False,
         random_voices: int = 0, accent_processes: bool = False) -> list[Clip]:
    """A split's items in a fixed order: rendition, voice, digit (so prefixes stay balanced).
    `more_voices` (EXTRA_TRAIN_VARIANTS) and `random_voices` (that many drawn speakers, accented
    if `accent_processes`) add training voices only: the test split never changes."""
    pairs = (train_voices(more_voices, random_voices, accent_processes) if split == "train"
             else _voices(TEST_ACCENTS, TEST_VARIANTS))
    clips = []
    for rendition in range(renditions):
        for accent, variant in pairs:
            for target, word in enumerate(WORDS):
                rng = seeded_generator(NAME, accent, variant, rendition, word)
                utterance = Utterance(
                    word=word,
                    accent=accent,
                    variant=variant,
                    speed_wpm=int(rng.integers(SPEED_WPM[0], SPEED_WPM[1] + 1)),
                    pitch=int(rng.integers(PITCH[0], PITCH[1] + 1)),
                    amplitude=int(rng.integers(AMPLITUDE[0], AMPLITUDE[1] + 1)),
                )
                clips.append(Clip(utterance, target, float(rng.random())))
    return clips


def default_cache_dir() -> Path:
    root = os.environ.get("S4SERVE_CACHE") or Path.home() / ".cache" / "s4serve"
    return Path(root) / "digits"


CLIPS_VERSION = 2  # 2: sox without dither; a cache of clips made otherwise is not reused


def _clip_path(cache_dir: Path, clip: Clip, sample_rate: int) -> Path:
    return (cache_dir / f"clips-v{CLIPS_VERSION}" / f"{sample_rate}hz"
            / f"{clip.utterance.file_stem()}.wav")


def generate(
    clips: list[Clip],
    cache_dir: Path,
    sample_rates: tuple[int, ...] = (SAMPLE_RATE_HZ,),
    workers: int | None = None,
) -> None:
    """Synthesise (16 kHz) and resample (other rates) every clip not already in the cache."""
    require_tools()

    def make(clip: Clip) -> None:
        source = _clip_path(cache_dir, clip, SAMPLE_RATE_HZ)
        if not source.exists():
            synthesize(clip.utterance, source, SAMPLE_RATE_HZ,
                       voices.private_data(cache_dir, clip.utterance.variant))
        for rate in sample_rates:
            target = _clip_path(cache_dir, clip, rate)
            if rate != SAMPLE_RATE_HZ and not target.exists():
                resample(source, target, rate)

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        list(pool.map(make, clips))


def assemble(clips: list[Clip], cache_dir: Path, sample_rate: int) -> Split:
    """Place each cached word at its onset inside a silent window: inputs (N, rate * 1 s, 1)."""
    length = round(sample_rate * WINDOW_SECONDS)
    inputs = np.zeros((len(clips), length, 1), dtype=np.float32)
    for row, clip in enumerate(clips):
        samples, rate = read_wav(_clip_path(cache_dir, clip, sample_rate))
        if rate != sample_rate:
            raise ValueError(f"cached clip has rate {rate}, expected {sample_rate}")
        samples = samples[:length]
        start = int(clip.onset_fraction * (length - len(samples)))
        inputs[row, start : start + len(samples), 0] = samples
    targets = np.array([clip.target for clip in clips], dtype=np.int64)
    return Split(inputs, targets)


def load(
    limit: int | None = None,
    cache_dir: str | Path | None = None,
    renditions: int = DEFAULT_RENDITIONS,
    workers: int | None = None,
    train_renditions: int | None = None,
    more_voices: bool = False,
    random_voices: int = 0,
    accent_processes: bool = False,
) -> Dataset:
    """Generate what is missing, then load train/test at 16 kHz plus the 8 kHz copy of test.
    `train_renditions` (default: `renditions`) gives training more takes per voice and
    `more_voices` more speaker variants and `random_voices` drawn speakers, while the held-out
    set stays the same."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    train_renditions = train_renditions or renditions
    train_clips = plan("train", train_renditions, more_voices, random_voices,
                       accent_processes)[:limit]
    test_clips = plan("test", renditions)[:limit]
    generate(train_clips, cache, workers=workers)
    generate(test_clips, cache, sample_rates=(SAMPLE_RATE_HZ, LOW_RATE_HZ), workers=workers)
    low_rate_test = assemble(test_clips, cache, LOW_RATE_HZ)
    return Dataset(
        name=NAME,
        train=dataclasses.replace(  # grouped by speaker variant, the unit the test holds out
            assemble(train_clips, cache, SAMPLE_RATE_HZ),
            groups=np.array([clip.utterance.variant for clip in train_clips])),
        test=assemble(test_clips, cache, SAMPLE_RATE_HZ),
        labels=list(WORDS),
        sample_rate=float(SAMPLE_RATE_HZ),
        provenance={
            "source": "espeak-ng words, sox resampling + silence trim (model/data/digits.py)",
            "split": "voice-disjoint: train and test share no accent and no speaker variant",
            "train_voices": [f"{a}+{v}" for a, v in
                             train_voices(more_voices, random_voices, accent_processes)],
            "test_voices": [f"{a}+{v}" for a, v in _voices(TEST_ACCENTS, TEST_VARIANTS)],
            "renditions_per_voice": renditions,
            "train_renditions_per_voice": train_renditions,
            "speed_wpm": list(SPEED_WPM),
            "pitch": list(PITCH),
            "amplitude": list(AMPLITUDE),
            "window_seconds": WINDOW_SECONDS,
        },
        extra_evaluations={
            "test_8khz": ExtraEvaluation(
                split=low_rate_test,
                rate=LOW_RATE_HZ / SAMPLE_RATE_HZ,
                description="test clips resampled to 8 kHz by sox, run at rate 0.5 (no retraining)",
            )
        },
    )
