"""Every bash and python example in README.md and docs/*.md runs as written, against a real
`s4serve serve` of the shipped models on 127.0.0.1:8000 (the URL the examples use).

A block that cannot run in a test (it builds images, retrains models, starts a foreground
server) says so on the line before it: `<!-- example: skip: <reason> -->`; the reason is
required. A load test sized to the machine's capacity says `<!-- example: scaled: <reason> -->`:
it runs with its load knobs (sessions, gateways, hold time) turned down, since whether a box
keeps up with the full load is a benchmark figure (`make bench`), not a test; its commands and
flags still run. A line `s4serve serve &` in an example is the server this test already runs. Python
blocks of one file run in order in one interpreter (later blocks use earlier names); each bash
block runs with `bash -e` and its background jobs are stopped when it ends. Examples run in a
scratch directory that links the repository's top-level entries, so what they write
(x.npy, exported/, run.png, ...) stays out of the repository.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from loadtest.processes import ServerProcess

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SKIP = re.compile(r"<!-- example: skip: (.+?) -->")
SCALED = re.compile(r"<!-- example: scaled: (.+?) -->")
# a load knob and the value a scaled example runs it at
KNOBS = [(re.compile(r"(--sessions |-e SESSIONS=)\d+"), "4"),
         (re.compile(r"(--gateways )\d+"), "2"),
         (re.compile(r"(--sessions-per-gateway )\d+"), "4"),
         (re.compile(r"(--hold |-e DURATION=)\d+"), "3")]
SERVER_LINE = re.compile(r"^\s*(\.venv/bin/)?s4serve serve &")


@dataclass
class Example:
    doc: Path
    line: int
    lang: str
    code: str
    skip: str | None
    scaled: bool = False

    @property
    def name(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def examples() -> list[Example]:
    found = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        i = 0
        while i < len(lines):
            fence = re.match(r"^```(\w+)\s*$", lines[i])
            if fence:
                end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
                if fence.group(1) in ("bash", "python"):
                    marker = SKIP.search(lines[i - 1]) if i else None
                    scaled = SCALED.search(lines[i - 1]) if i else None
                    assert not scaled or len(scaled.group(1).strip()) > 10, "give the reason"
                    found.append(Example(doc, i + 1, fence.group(1),
                                         "\n".join(lines[i + 1:end]),
                                         marker.group(1) if marker else None, bool(scaled)))
                i = end
            i += 1
    return found


def test_every_example_runs_or_says_why_not():
    found = examples()
    assert len(found) >= 30  # the extraction itself works
    for ex in found:
        assert ex.skip is None or len(ex.skip.strip()) > 10, f"{ex.name}: give the reason"
    assert sum(ex.skip is None for ex in found) >= 20


def test_scaled_examples_turn_every_load_knob_down():
    scaled = [ex for ex in examples() if ex.scaled]
    assert scaled
    for ex in scaled:
        down = scale_down(ex.code)
        assert down != ex.code, f"{ex.name}: marked scaled but has no load knob"
        assert not re.search(r"--sessions (\d{2,})|SESSIONS=(\d{2,})", down), ex.name


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A directory that looks like the repository (links) but keeps what examples write."""
    root = tmp_path_factory.mktemp("examples")
    for entry in REPO.iterdir():
        if entry.name not in (".git",):
            (root / entry.name).symlink_to(entry)
    if not (root / ".venv").exists():
        (root / ".venv").symlink_to(Path(sys.prefix))
    return root


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`s4serve serve` as `make serve` runs it (shipped models, default settings)."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 8000)) == 0:
            pytest.fail("port 8000 is in use: the examples need it for their server")
    log = tmp_path_factory.mktemp("served") / "server.log"
    with ServerProcess.s4serve([], port=8000, log_path=log) as server:
        yield server.url


def scale_down(code: str) -> str:
    for knob, value in KNOBS:
        code = knob.sub(lambda m, value=value: m.group(1) + value, code)
    return code


def _bash(code: str) -> str:
    kept = [": # the test's server" if SERVER_LINE.match(line) else line
            for line in code.splitlines()]
    return "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\nset -e -o pipefail\n" + "\n".join(
        kept)


RUNNABLE = [ex for ex in examples() if ex.skip is None]
BASH = [ex for ex in RUNNABLE if ex.lang == "bash"]
PY_DOCS = sorted({ex.doc for ex in RUNNABLE if ex.lang == "python"})


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("ex", BASH, ids=[ex.name for ex in BASH])
def test_bash_example(ex: Example, served: str, scratch: Path):
    code = scale_down(ex.code) if ex.scaled else ex.code
    result = subprocess.run(["bash", "-c", _bash(code)], cwd=scratch, env=_env(),
                            capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, f"{ex.name}:\n{ex.code}\n---\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("doc", PY_DOCS, ids=[str(d.relative_to(REPO)) for d in PY_DOCS])
def test_python_examples(doc: Path, served: str, scratch: Path):
    blocks = [ex for ex in RUNNABLE if ex.lang == "python" and ex.doc == doc]
    script = "\n".join(f"print('--- example at line {ex.line}', flush=True)\n{ex.code}"
                       for ex in blocks)
    result = subprocess.run([sys.executable, "-c", script], cwd=scratch, env=_env(),
                            capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, f"{doc.name}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
