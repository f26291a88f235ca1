"""Random espeak-ng speakers: variant files drawn from the range the stock variants span.

espeak-ng ships ~100 speaker variants; a model trained on a few hundred voices built from them
still fits its training speakers and misses unseen ones (docs/models.md). A variant is a small
text file (pitch range, per-formant frequency / height / width in percent, voicing, consonant
strength, roughness, the Klatt mode), so new speakers can be drawn at random. Each is seeded by
its name, so every machine writes the same files. Klatt modes 4 and up are never drawn: they
belong to the held-out variants `klatt4` and `edward`, and no test speaker may be heard in
training.

espeak-ng looks variants up only under its data directory, so `private_data` builds one beside
the cache (the system's data linked, the random variants added) and synthesis points `--path`
at it.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np

from model.data.base import seeded_generator

PREFIX = "rnd2"  # the recipe's version: cached clips are named after their variant
ACCENTED = "rnd3"  # the same speakers, each with sound changes of real Englishes drawn too
KLATT_MODES = (0, 1, 2, 3)  # 0: espeak-ng's own synthesiser
GROUP = 100
# Sound changes heard in real Englishes, as espeak-ng `replace` lines (flags 01: only at the
# end of a word). A speaker has each source phoneme changed with probability ACCENT_PROB, into
# one of its alternatives. Without them the only stop heard in place of "th" is the Caribbean
# accent's (en-029 says "three" as t[ri:), so a model may take any dental stop for "three".
# An accent's own replacements come first: with en-029 a drawn /θ/ change does nothing.
ACCENT_PROB = 0.3
ACCENT_PROCESSES: dict[str, tuple[tuple[str, str], ...]] = {
    "t": (("00", "t["), ("01", "?")),  # dental t (Irish, Indian); final glottal stop (London)
    "T": (("00", "t["), ("00", "f")),  # th-stopping (Caribbean, Irish); th-fronting (London)
    "v": (("00", "w"),),  # v/w merger (Indian English)
    "w": (("00", "v"),),  # (German, Slavic, Hindi speakers' English)
    "z": (("00", "s"),),  # devoiced z (German, Dutch, Spanish speakers' English)
}


def name(index: int, accented: bool = False) -> str:
    return f"{ACCENTED if accented else PREFIX}{index:04d}"


def _drawn(variant: str) -> tuple[bool, int] | None:
    """(accented, index) of a drawn speaker's name; None for a stock variant."""
    found = re.fullmatch(f"({PREFIX}|{ACCENTED})(\\d+)", variant)
    return None if found is None else (found.group(1) == ACCENTED, int(found.group(2)))


def accent_lines(variant: str) -> list[str]:
    """The `replace` lines of an accented speaker (none for the others): ACCENT_PROCESSES."""
    if not variant.startswith(ACCENTED):
        return []
    rng = seeded_generator("s4serve-accent", variant)
    lines = []
    for source, alternatives in ACCENT_PROCESSES.items():
        if rng.random() < ACCENT_PROB:
            flags, target = alternatives[int(rng.integers(len(alternatives)))]
            lines.append(f"replace {flags} {source} {target}")
    return lines


def variant_text(variant: str) -> str:
    """The variant file of one random speaker: a vocal-tract scale shared by its formants
    (longer for lower, male-like voices), each formant then moved, raised and widened on its
    own over the range the stock variants use (e.g. `travis` puts F1 at 50 %, `michel` F4 at
    30 % height), and for some a spectral tilt (`tone`)."""
    drawn = _drawn(variant)
    # an accented speaker is drawn as its plain twin, then given its sound changes
    rng = seeded_generator("s4serve-voice", variant if drawn is None else name(drawn[1]))
    female = bool(rng.random() < 0.5)
    low = int(rng.integers(140, 191)) if female else int(rng.integers(60, 101))
    high = low + int(rng.integers(40, 71) if female else rng.integers(30, 61))
    tract = rng.uniform(1.03, 1.15) if female else rng.uniform(0.88, 1.02)
    lines = ["language variant", f"name {variant}", f"gender {'female' if female else 'male'}",
             f"pitch {low} {high}"]
    for formant in range(9):
        spread = np.log(1.15) if formant == 0 else np.log(1.35)
        frequency = round(100 * tract * np.exp(rng.uniform(-spread, spread)))
        height = int(rng.integers(30, 121))
        width = int(rng.integers(50, 201))
        lines.append(f"formant {formant} {frequency} {height} {width}")
    lines += [
        f"voicing {int(rng.integers(50, 221))}",
        f"consonants {int(rng.integers(50, 201))} {int(rng.integers(50, 201))}",
        f"roughness {int(rng.integers(0, 4))}",
        f"flutter {int(rng.integers(0, 4))}",
    ]
    if rng.random() < 0.3:
        corners = np.sort(rng.uniform(300, 4000, size=3)).round().astype(int)
        gains = rng.integers(40, 151, size=3)
        lines.append("tone " + " ".join(f"{f} {g}" for f, g in zip(corners, gains, strict=True)))
    klatt = int(rng.choice(KLATT_MODES, p=(0.55, 0.15, 0.15, 0.15)))
    if klatt:
        lines.append(f"klatt {klatt}")
    return "\n".join(lines + accent_lines(variant)) + "\n"


@functools.cache
def system_data() -> Path:
    """The espeak-ng data directory the installed binary reads (it prints it with --version)."""
    found = re.search(r"Data at:\s*(\S+)", subprocess.run(
        ["espeak-ng", "--version"], check=True, capture_output=True, text=True).stdout)
    if not found:
        raise RuntimeError("espeak-ng --version did not name its data directory")
    return Path(found.group(1))


def private_data(root: Path, variant: str) -> Path | None:
    """The directory to pass as espeak-ng's --path for a random variant (None for a stock one,
    which the system's data holds): the system's data (linked, not copied) with a `voices/!v`
    holding only the random variants of its group.
    espeak-ng lists at most 349 voices (languages and variants together; 131 + ~100 stock
    variants here), so the random ones are spread over groups of GROUP. Built once, atomically."""
    drawn = _drawn(variant)
    if drawn is None:
        return None
    accented, group = drawn[0], drawn[1] // GROUP
    home = root / "espeak" / f"{ACCENTED if accented else PREFIX}-group{group:03d}"
    if (home / "complete").is_file():
        return home
    staging = home.with_name(f".{home.name}.{os.getpid()}.{threading.get_ident()}")
    shutil.rmtree(staging, ignore_errors=True)
    system = system_data()
    data = staging / "espeak-ng-data"
    (data / "voices" / "!v").mkdir(parents=True)
    for entry in system.iterdir():
        if entry.name != "voices":
            (data / entry.name).symlink_to(entry)
    for entry in (system / "voices").iterdir():
        if entry.name != "!v":
            (data / "voices" / entry.name).symlink_to(entry)
    for index in range(group * GROUP, (group + 1) * GROUP):
        speaker = name(index, accented)
        (data / "voices" / "!v" / speaker).write_text(variant_text(speaker))
    (staging / "complete").touch()
    try:
        staging.rename(home)
    except OSError:  # another thread or process built it first
        shutil.rmtree(staging, ignore_errors=True)
    return home
