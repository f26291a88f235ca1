"""The whole-network S4D step in C (model/native_step.c), on flat state rows, in place.

The AOTInductor step (model/aot_step.py) runs a graph: each layer's state is read and written
several times per step (new state, output reduction, the final concatenation into fresh rows),
and the caller copies the new rows back into its slot pool. This step reads each session's
rows once and writes them once, in place, so the server steps a run of slot-pool rows without
a gather or a scatter; one call per batch, no per-kernel overhead at B=1. It covers S4D
networks (every encoder, norm, residual, pooling and decoder option); other networks use the
graph steps.

The C source is compiled once per machine and compiler by the system C compiler (-O3,
-march=native: the CPU's vector ISA) into the compile cache, and loaded with ctypes, which
releases the GIL for the call. Where no compiler is installed, the portable build that the wheel
carries serves (model/native_build.py).
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import functools
import hashlib
import os
import platform
import subprocess
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.fused import StateLayout
from model.native_build import (
    FLAGS,
    PORTABLE_CPU_FLAGS,
    SOURCE,
    c_compiler,
    compile_library,
    cpu_flags,
    portable_name,
)
from model.native_rows import RowsCall, checked

PREBUILT_DIR = SOURCE.parent  # where the wheel puts the portable library
_loaded: dict[Path, ctypes.CDLL] = {}


class _Layer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in (
        "da_re", "da_im", "db_re", "db_im", "c_re", "c_nim", "skip", "w_t", "bias", "ln_w",
        "ln_b")] + [("off_re", ctypes.c_long), ("off_im", ctypes.c_long)] + [
        (name, ctypes.c_void_p) for name in ("wa_re", "wa_im", "wb_re", "wb_im", "wc_re",
                                             "wc_nim")]


class _Net(ctypes.Structure):
    _fields_ = ([(name, ctypes.c_int) for name in (
        "d_input", "d_model", "d_output", "channels", "n2", "n_layers", "prenorm", "residual",
        "pooled")] + [("ln_eps", ctypes.c_float)]
        + [(name, ctypes.c_void_p) for name in ("enc_w_t", "enc_b", "dec_w_t", "dec_b")]
        + [(name, ctypes.c_long) for name in ("off_sum", "off_count", "width32", "width64")]
        + [("layers", ctypes.POINTER(_Layer))])


def prebuilt() -> Path | None:
    """The portable library shipped in the wheel (model/native_build.py), when it was built
    from this source and this CPU can run it; else None."""
    path = PREBUILT_DIR / portable_name()
    if path.exists() and cpu_flags() >= PORTABLE_CPU_FLAGS:
        return path
    return None


def unsupported(rec: nn.Module) -> str | None:
    """Why this recurrent network has no native step (None: it has one)."""
    cfg = rec.config
    if cfg.layer != "s4d":
        return f"layer {cfg.layer!r} (the native step is S4D's)"
    if cfg.channels > 1 and rec.pooled:
        return "channels > 1 with a pooled head"
    if any(p.device.type != "cpu" for p in rec.parameters()):
        return "not on the CPU"
    if any(p.dtype != torch.float32 for p in rec.parameters()):
        return "weights not float32"
    if c_compiler() is None and prebuilt() is None:
        return "no C compiler, and no prebuilt library for this CPU"
    return None


@functools.cache  # a compiler subprocess and the source's hash: once per process
def _build_key(compiler: str) -> str:
    h = hashlib.sha256(SOURCE.read_bytes())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    h.update(f"{version}|{FLAGS}|{platform.machine()}".encode())
    h.update(" ".join(sorted(cpu_flags())).encode())  # -march=native: the library is this CPU's
    return h.hexdigest()[:24]


def library(cache_dir: Path) -> ctypes.CDLL:
    """The compiled step in `cache_dir`, built first if it is not there (serialised by a lock
    file, so the workers of one server build it once); where no compiler is, the prebuilt
    portable library."""
    compiler = c_compiler()
    if compiler is None:
        path = prebuilt()
        if path is None:
            raise RuntimeError("the native step needs a C compiler (cc, gcc or clang) or a "
                               "prebuilt library for this CPU")
    else:
        path = cache_dir / f"native-{_build_key(compiler)}.so"
    if path in _loaded:
        return _loaded[path]
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():
                partial = path.with_suffix(f".{os.getpid()}.partial.so")
                try:
                    compile_library(compiler, FLAGS, partial)
                    os.replace(partial, path)
                finally:
                    partial.unlink(missing_ok=True)
    lib = ctypes.CDLL(str(path))
    fn = lib.s4d_network_run
    fn.restype = ctypes.c_long
    # after the inputs: the states, outputs, rows and flags (pointer, stride or count)
    rows = [ctypes.c_void_p, ctypes.c_long] * 4 + [ctypes.c_void_p]
    fn.argtypes = [ctypes.POINTER(_Net), ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                   ctypes.c_long, *rows]
    at = lib.s4d_network_run_at
    at.restype = ctypes.c_long
    # the inputs' buffer as c_void_p: a bytes object passes as a pointer to its data, no copy
    at.argtypes = [ctypes.POINTER(_Net), ctypes.c_long, ctypes.c_void_p, ctypes.c_long,
                   ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, *rows]
    each = lib.s4d_network_run_each
    each.restype = ctypes.c_long
    each.argtypes = [ctypes.POINTER(_Net), ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                     ctypes.c_void_p, ctypes.c_long, *rows]
    _loaded[path] = lib
    return lib


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def _wide(layer: nn.Module) -> tuple[torch.Tensor, ...]:
    """A diagonal recurrence's float64 Ā, B̄ and 2C as the C step reads them: real parts and
    imaginary parts (C's negated)."""
    da, db, c2 = (layer.wide[name] for name in ("da", "db", "c2"))
    return da.real, da.imag, db.real, db.imag, c2.real, -c2.imag


class _Bound:
    """One recurrent network's C view: the Net struct and the tensors its pointers point
    into (kept alive here)."""

    def __init__(self, rec: nn.Module, layout: StateLayout) -> None:
        cfg, keep = rec.config, []
        hc, n2 = cfg.channels * cfg.d_model, cfg.d_state // 2
        if (layout.width32 != len(rec.layers) * 2 * hc * n2
                or layout.width64 != (cfg.d_model + 1 if rec.pooled else 0)):
            raise ValueError("the state layout is not this network's")  # C would overrun

        def ptr(t: torch.Tensor | None) -> int | None:
            if t is None:
                return None
            keep.append(t)
            return t.data_ptr()

        offsets = dict(zip(layout.names, layout.offsets, strict=True))
        layers, eps = [], 1e-5
        for i, (block, layer) in enumerate(zip(rec.blocks, rec.layers, strict=True)):
            norm = block.norm if isinstance(block.norm, nn.LayerNorm) else None
            if norm is not None:
                eps = norm.eps
            linear = layer.output_linear
            layers.append(_Layer(
                *(ptr(_f32(getattr(layer, name))) for name in (
                    "da_re", "da_im", "db_re", "db_im", "c2_re", "neg_c2_im", "skip")),
                ptr(_f32(linear.weight.T)), ptr(_f32(linear.bias)),
                ptr(_f32(norm.weight)) if norm is not None else None,
                ptr(_f32(norm.bias)) if norm is not None else None,
                offsets[f"layer{i}.re"], offsets[f"layer{i}.im"],
                *(ptr(part.contiguous()) for part in _wide(layer))))
        self.layers = (_Layer * len(layers))(*layers)
        enc = rec.encoder if isinstance(rec.encoder, nn.Linear) else None
        dec = rec.decoder if isinstance(rec.decoder, nn.Linear) else None
        self.net = _Net(
            cfg.d_input, cfg.d_model, cfg.d_output, cfg.channels, cfg.d_state // 2,
            len(layers), int(cfg.prenorm), int(cfg.residual), int(rec.pooled), eps,
            ptr(_f32(enc.weight.T)) if enc else None, ptr(_f32(enc.bias)) if enc else None,
            ptr(_f32(dec.weight.T)) if dec else None, ptr(_f32(dec.bias)) if dec else None,
            offsets.get("pool.sum", 0), offsets.get("pool.count", 0), layout.width32,
            layout.width64, self.layers)
        self.ref = ctypes.byref(self.net)
        self._keep = keep


class NativeStep:
    """`step(rec, u, flat32, flat64) -> (y, flat32, flat64)` for every rate of one S4D
    network, and `chunk` for blocks of T samples (exactly T steps): the rows are advanced in
    place and returned (a row whose inputs or outputs are not all finite is left as it was)."""

    def __init__(self, template: nn.Module, layout: StateLayout, cache_dir: Path) -> None:
        reason = unsupported(template)
        if reason is not None:
            raise ValueError(f"no native step for this network: {reason}")
        self.layout = layout
        lib = library(cache_dir)
        self._run, self._run_at = lib.s4d_network_run, lib.s4d_network_run_at
        self._run_each = lib.s4d_network_run_each
        # the longest block stepped as exactly its single steps (float32 at every sample)
        self.narrow_steps = ctypes.c_long.in_dll(lib, "s4d_narrow_steps").value
        self._d_input, self._d_output = template.config.d_input, template.config.d_output

    def __call__(self, rec: nn.Module, u: torch.Tensor, flat32: torch.Tensor,
                 flat64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """u (B, d_input) -> y (B, d_output); the rows advanced by one sample."""
        if u.dim() != 2:
            raise ValueError(f"u must be (batch, {self._d_input}), got {tuple(u.shape)}")
        return self._advance(rec, u, flat32, flat64), flat32, flat64

    def chunk(self, rec: nn.Module, u: torch.Tensor, flat32: torch.Tensor,
              flat64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """u (B, T, d_input) -> y (B, T, d_output); the rows advanced by T samples."""
        if u.dim() != 3:
            raise ValueError(f"u must be (batch, steps, {self._d_input}), got "
                             f"{tuple(u.shape)}")
        return self._advance(rec, u, flat32, flat64), flat32, flat64

    def at_rows_into(self, rec: nn.Module, u: np.ndarray, pool32: torch.Tensor,
                     pool64: torch.Tensor, rows: np.ndarray, y: np.ndarray,
                     kept: np.ndarray, steps: np.ndarray | None = None) -> int:
        """Rows `rows` (B distinct indices) of the pool's (S, W32), (S, W64) state advanced by
        one sample where they lie (no gather, no scatter), on numpy views that may have any
        row stride (the records of a wire message and of its reply): u (B, d_input) read,
        y (B, d_output) written, kept (B) uint8 set to whether each row's state was replaced.
        With `steps` (B,) int64, each of at most K: row b advances by steps[b] samples,
        u (B, K, d_input) and y (B, K, d_output) contiguous, as one block (exactly that many
        steps; kept when all its inputs and outputs are finite). Returns how many were."""
        if rows.ndim != 1 or len(rows) != len(u):
            raise ValueError(f"rows must be one index per input, got {rows.shape}")
        self._check_rows(rows, kept)
        self._check_states(pool32, pool64, pool32.shape[0])
        if steps is not None:
            return self._blocks(rec, u, pool32, pool64, rows, y, kept, steps)
        self._check_records("u", u, len(rows), self._d_input, writable=False)
        self._check_records("y", y, len(rows), self._d_output, writable=True)
        if not len(rows):
            return 0
        return checked(self._run(
            self._bound(rec).ref, len(rows), 1, u.ctypes.data, u.strides[0] // 4,
            pool32.data_ptr(), pool32.stride(0), pool64.data_ptr(), pool64.stride(0),
            y.ctypes.data, y.strides[0] // 4, rows.ctypes.data, pool32.shape[0],
            kept.ctypes.data), pool32.shape[0])

    def _blocks(self, rec: nn.Module, u: np.ndarray, pool32: torch.Tensor,
                pool64: torch.Tensor, rows: np.ndarray, y: np.ndarray, kept: np.ndarray,
                steps: np.ndarray) -> int:
        batch, most = u.shape[0], u.shape[1] if u.ndim == 3 else -1
        for name, a, width, writable in (("u", u, self._d_input, False),
                                         ("y", y, self._d_output, True)):
            if (a.dtype != np.float32 or a.shape != (batch, most, width)
                    or not a.flags.c_contiguous or (writable and not a.flags.writeable)):
                raise ValueError(f"{name} must be contiguous float32 ({batch}, K, {width}) "
                                 f"with u and y of one K, got {a.dtype} {a.shape}")
        if (steps.dtype != np.int64 or steps.shape != (batch,)
                or not steps.flags.c_contiguous):
            raise ValueError(f"steps must be contiguous int64 ({batch},), got {steps.dtype} "
                             f"{steps.shape}")
        if not batch:
            return 0
        done = self._run_each(
            self._bound(rec).ref, batch, most, steps.ctypes.data, u.ctypes.data,
            most * self._d_input, pool32.data_ptr(), pool32.stride(0), pool64.data_ptr(),
            pool64.stride(0), y.ctypes.data, most * self._d_output, rows.ctypes.data,
            pool32.shape[0], kept.ctypes.data)
        if done == -4:
            raise ValueError(f"steps must lie in [0, {most}]")
        return checked(done, pool32.shape[0])

    def rows_call(self, rec: nn.Module, pool32: torch.Tensor, pool64: torch.Tensor,
                  rows: np.ndarray, y: np.ndarray, kept: np.ndarray,
                  keys: np.ndarray | None = None,
                  counts: array.array | None = None) -> RowsCall:
        """`at_rows_into` for these rows, outputs and flags, checked once, with the inputs
        read from a byte buffer at each call (a wire message as received): the call a
        connection makes for every message of the same sessions. `keys` (B, 2) uint32: what
        the 8 bytes before each input must hold (each record's header), checked by every
        call before anything changes. `counts` (array "q", one per pool row): each call adds
        one to the count of every row it advanced."""
        self._check_rows(rows, kept)
        self._check_records("y", y, len(rows), self._d_output, writable=True)
        self._check_states(pool32, pool64, pool32.shape[0])
        if keys is not None and (keys.dtype != np.uint32 or keys.shape != (len(rows), 2)
                                 or not keys.flags.c_contiguous):
            raise ValueError(f"keys must be contiguous uint32 ({len(rows)}, 2), got "
                             f"{keys.dtype} {keys.shape}")
        if counts is not None and (counts.typecode != "q" or len(counts) != pool32.shape[0]):
            raise ValueError(f"counts must be an array of {pool32.shape[0]} int64 (\"q\")")
        return RowsCall(self._run_at, self._bound(rec), self._d_input, pool32, pool64, rows, y,
                        kept, keys, counts)

    @staticmethod
    def _check_rows(rows: np.ndarray, kept: np.ndarray) -> None:
        if rows.ndim != 1:
            raise ValueError(f"rows must be one index per input, got {rows.shape}")
        if (rows.dtype != np.int64 or kept.dtype != np.uint8
                or kept.shape != rows.shape or not (rows.flags.c_contiguous and rows.flags.aligned
                                                    and kept.flags.c_contiguous)
                or not kept.flags.writeable):
            raise ValueError("rows must be contiguous int64 and kept contiguous, writable "
                             "uint8, one per input")

    @staticmethod
    def _check_records(name: str, a: np.ndarray, batch: int, width: int, writable: bool) -> None:
        if (a.dtype != np.float32 or a.shape != (batch, width) or a.strides[1] != 4
                or a.strides[0] % 4 or not a.flags.aligned
                or (writable and not a.flags.writeable)):
            raise ValueError(f"{name} must be float32 ({batch}, {width}) rows of whole "
                             f"floats{', writable' if writable else ''}, got {a.dtype} "
                             f"{a.shape} strides {a.strides}")

    def _bound(self, rec: nn.Module) -> _Bound:
        bound = rec.__dict__.get("_native")
        if bound is None:  # a rate's tables, bound once and kept with its recurrence
            bound = rec.__dict__["_native"] = _Bound(rec, self.layout)
        return bound

    def _check_states(self, flat32: torch.Tensor, flat64: torch.Tensor, count: int) -> None:
        for state, dtype, width in ((flat32, torch.float32, self.layout.width32),
                                    (flat64, torch.float64, self.layout.width64)):
            if (state.dtype != dtype or tuple(state.shape) != (count, width)
                    or (width > 1 and state.stride(1) != 1) or state.device.type != "cpu"):
                raise ValueError(f"state rows must be {dtype} ({count}, {width}) with unit "
                                 f"column stride on the CPU, got {state.dtype} "
                                 f"{tuple(state.shape)}")

    def _advance(self, rec: nn.Module, u: torch.Tensor, flat32: torch.Tensor,
                 flat64: torch.Tensor) -> torch.Tensor:
        """u (B, d_input), one step, or (B, T, d_input) -> y (B, d_output) or (B, T, d_output)."""
        bound = self._bound(rec)
        batch, steps = u.shape[0], 1 if u.dim() == 2 else u.shape[1]
        if u.dtype != torch.float32 or u.shape[-1] != self._d_input or u.device.type != "cpu":
            raise ValueError(f"u must be float32 (..., {self._d_input}) on the CPU, got "
                             f"{u.dtype} {tuple(u.shape)}")
        if u.stride(-1) != 1 or (steps > 1 and u.stride(1) != self._d_input):
            u = u.contiguous()
        self._check_states(flat32, flat64, batch)
        y = torch.empty(*u.shape[:-1], self._d_output)
        if not (batch and steps):
            return y
        checked(self._run(
            bound.ref, batch, steps, u.data_ptr(), u.stride(0), flat32.data_ptr(),
            flat32.stride(0), flat64.data_ptr(), flat64.stride(0), y.data_ptr(),
            steps * self._d_output, None, batch, None), batch)
        return y
