"""The flat step as one AOTInductor package per network, built once and cached on disk.

`FusedStep` (model/fused.py) is a torch.compile graph: every call goes through dynamo's guards
and AOTAutograd's runtime wrappers, ~150 us of Python before the generated code runs, which is
most of a small batch's cost. Here the same flat step is exported once (torch.export, the batch
dimension dynamic), compiled by AOTInductor into a shared library, and called through its C++
runner: one call per batch whatever its size. The discretised tables of a rate (Ā, B̄, C, ...)
are inputs, so one package serves every sample rate; the network's other weights are packed
into it.

A package is named by a fingerprint of everything it depends on (weights, state layout, the
model code, torch, the CPU's vector ISA), so a server that restarts loads it in milliseconds
and a changed model or machine builds a new one. Builds are serialised by a lock file, so the
workers of one server build a model once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from model.fused import StateLayout, _Step, tables

# the largest batch a package accepts (far above any slot pool)
MAX_BATCH = 1 << 16
_CODE = ("fused.py", "recurrent.py", "network.py", "aot_step.py")


def vector_isa() -> str:
    """The SIMD flavour inductor generates CPU code for (a package built for AVX-512 must not
    be loaded on a machine without it)."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        return str(pick_vec_isa())
    except Exception:  # an unknown ISA just gets packages of its own
        return "unknown"


def fingerprint(template: nn.Module, layout: StateLayout, device: torch.device) -> str:
    """SHA-256 (hex, 24 chars) of the weights, the layout, the model code and the toolchain."""
    h = hashlib.sha256()
    h.update(f"{torch.__version__}|{device.type}|{vector_isa()}|{layout!r}".encode())
    here = Path(__file__).resolve().parent
    for name in _CODE:
        h.update((here / name).read_bytes())
    for name, tensor in sorted(template.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


class _FlatTables(nn.Module):
    """`_Step` with the tables as positional inputs, in a fixed order (what export needs)."""

    def __init__(self, step: _Step, names: list[str]) -> None:
        super().__init__()
        self.step, self.names = step, names

    def forward(self, u: torch.Tensor, flat32: torch.Tensor, flat64: torch.Tensor,
                *tabs: torch.Tensor):
        return torch.func.functional_call(self.step, dict(zip(self.names, tabs, strict=True)),
                                          (u, flat32, flat64))


def build(template: nn.Module, layout: StateLayout, path: Path) -> None:
    """Export and compile the flat step of `template` into the package `path`."""
    step = _Step(template, layout).eval()
    tabs = tables(template)
    names = list(tabs)
    device = next(template.buffers()).device
    batch = 2  # an example batch; the dimension is exported as dynamic
    u = torch.zeros(batch, template.config.d_input, device=device)
    flat32 = torch.zeros(batch, layout.width32, device=device)
    flat64 = torch.zeros(batch, layout.width64, dtype=torch.float64, device=device)
    dim = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    shapes = ({0: dim}, {0: dim}, {0: dim}, tuple(None for _ in names))
    with torch.inference_mode():
        program = torch.export.export(_FlatTables(step, names), (u, flat32, flat64, *tabs.values()),
                                      dynamic_shapes=shapes, strict=False)
        # autotuned GEMMs: inductor's own micro-kernel for the small linears beats a
        # library call at B=1 (a whole-network step 30% faster); no slower at B=1024
        torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                 inductor_configs={"max_autotune_gemm": True})


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _scratch_tmpdir() -> Iterator[None]:
    """TMPDIR pointed at a fresh directory, removed afterwards. torch's package loader unpacks
    the package's shared library into `$TMPDIR/aotinductor_*` and never removes it: ~3 MB left
    in /tmp by every load (517 had piled up on our development machine). The library
    stays mapped once loaded, so its file can go at once."""
    scratch = tempfile.mkdtemp(prefix="s4serve-aoti-")
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = scratch
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = before
        shutil.rmtree(scratch, ignore_errors=True)


def package_for(template: nn.Module, layout: StateLayout, cache_dir: Path) -> Path:
    """The package of this network in `cache_dir`, built first if it is not there."""
    device = next(template.buffers()).device
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"step-{fingerprint(template, layout, device)}.pt2"
    if path.exists():
        return path
    with _locked(path.with_suffix(".lock")):
        if not path.exists():  # another process may have built it while we waited
            partial = path.with_suffix(f".{os.getpid()}.partial.pt2")
            try:
                build(template, layout, partial)
                os.replace(partial, path)
            finally:
                partial.unlink(missing_ok=True)
    return path


class AotStep:
    """`step(rec, u, flat32, flat64) -> (y, flat32', flat64')` for every rate of one network,
    through its AOTInductor package."""

    def __init__(self, template: nn.Module, layout: StateLayout, cache_dir: Path) -> None:
        self.path = package_for(template, layout, cache_dir)
        self.names = list(tables(template))
        with _scratch_tmpdir():
            package = torch._inductor.aoti_load_package(str(self.path))
        # the package's loader runs a flat list of inputs; its Python __call__ would first
        # parse the call's tree specs from JSON and flatten them, ~50 us on every call
        self._run = getattr(package.loader, "run", None)
        self._package = package

    def __call__(self, rec: nn.Module, u: torch.Tensor, flat32: torch.Tensor,
                 flat64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tabs = rec.__dict__.get("_aot_tables")
        if tabs is None:  # a recurrence's tables, in the package's input order, kept with it
            found = tables(rec)
            tabs = rec.__dict__["_aot_tables"] = tuple(found[name] for name in self.names)
        if self._run is None:  # a torch whose loader has no flat `run`
            return tuple(self._package(u, flat32, flat64, *tabs))
        return tuple(self._run([u, flat32, flat64, *tabs]))
