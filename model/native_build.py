"""How model/native_step.c becomes a library (standard library only: setup.py loads this file).

At run time the step is compiled once per machine into the compile cache with -march=native
(model/native_step.py). Where no C compiler is installed (the container image), a portable
build serves instead: setup.py compiles it into the wheel for x86-64 CPUs with the x86-64-v3
features (AVX2 and FMA; Intel Haswell and AMD Zen on), named by the source's hash, so that a
library built from another version of the source is never loaded.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import platform
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("native_step.c")
# -fno-trapping-math: without it GCC left the GELU and GLU loops scalar ("control flow in
# loop": it will not turn the exp's clamp into a vector select when a comparison may trap);
# results are unchanged (no reassociation, same rounding), and no one reads FP exception
# flags. Measured (session 20, reference network, one thread): B=1024 35.5 / 36.3 -> 29.6 /
# 28.4 ms, B=8 -17%.
# -ffp-contract=off: the C source writes out its fused multiply-adds; nothing else may be fused,
# else GCC's choice depends on the loop around an expression and rows stepped together and
# alone differ in the last bit.
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-trapping-math", "-ffp-contract=off",
         "-fPIC", "-shared")
PORTABLE_MARCH = "x86-64-v3"
# what x86-64-v3 code may use, as /proc/cpuinfo names it (LZCNT is "abm")
PORTABLE_CPU_FLAGS = frozenset({"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"})


def c_compiler() -> str | None:
    for name in ("cc", "gcc", "clang"):
        if path := shutil.which(name):
            return path
    return None


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    return frozenset()


@functools.cache
def portable_name(source: Path = SOURCE) -> str:
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    return f"native_step-{digest}-{PORTABLE_MARCH}.so"


def compile_library(compiler: str, flags: tuple[str, ...], out: Path,
                    source: Path = SOURCE) -> None:
    subprocess.run([compiler, *flags, str(source), "-o", str(out), "-lm"], check=True,
                   capture_output=True, text=True)


def can_build_portable() -> bool:
    """Whether this machine can compile the portable library: an x86-64 with a C compiler."""
    return platform.machine() in ("x86_64", "AMD64") and c_compiler() is not None


def build_portable(out_dir: Path) -> Path | None:
    """The portable library compiled into `out_dir`; None where it cannot be
    (`can_build_portable`)."""
    if not can_build_portable():
        return None
    flags = tuple(f"-march={PORTABLE_MARCH}" if f == "-march=native" else f for f in FLAGS)
    out = out_dir / portable_name()
    compile_library(c_compiler(), flags, out)
    return out
