"""Flat recurrent states and one fused step per network that serves every rate.

A network's state is a list of tensors (model/network.py, `state_spec`). Kept per session as
two flat rows, float32 and float64 (`StateLayout`), a batch of sessions is gathered and
scattered with one indexed copy each instead of one per tensor.

`FusedStep` runs `RecurrentNetwork.step` on flat states with the discretised tables (Ā, B̄,
C, ... of one rate) passed as inputs, not baked in: compiled once by torch.compile (inductor,
which fuses the memory-bound elementwise work into one loop per layer), it serves every sample
rate without a recompile; a new rate costs only its discretisation.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class StateLayout:
    """Where each state tensor lives in the flat float32 / float64 rows."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    wide: tuple[bool, ...]  # float64 (in the wide row) or float32
    offsets: tuple[int, ...]  # start within its row
    width32: int
    width64: int

    @classmethod
    def of(cls, spec) -> StateLayout:
        """From (name, shape, dtype) entries; dtype a torch dtype or its name."""
        names, shapes, wides, offsets, used = [], [], [], [], [0, 0]
        for name, shape, dtype in spec:
            dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            if dtype not in (torch.float32, torch.float64):
                raise ValueError(f"state tensors must be float32 or float64, got {dtype}")
            wide = dtype == torch.float64
            names.append(name)
            shapes.append(tuple(int(n) for n in shape))
            wides.append(wide)
            offsets.append(used[wide])
            used[wide] += torch.Size(shape).numel()
        return cls(tuple(names), tuple(shapes), tuple(wides), tuple(offsets), *used)

    def split(self, flat32: torch.Tensor, flat64: torch.Tensor) -> list[torch.Tensor]:
        """(B, W32), (B, W64) -> the state tensors, as views."""
        out = []
        for shape, wide, start in zip(self.shapes, self.wide, self.offsets, strict=True):
            row = flat64 if wide else flat32
            size = torch.Size(shape).numel()
            out.append(row[:, start:start + size].reshape(row.shape[0], *shape))
        return out

    def join(self, state: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The state tensors -> new (B, W32), (B, W64) rows."""
        batch = state[0].shape[0]
        narrow = [x.reshape(batch, -1) for x, w in zip(state, self.wide, strict=True) if not w]
        wide = [x.reshape(batch, -1) for x, w in zip(state, self.wide, strict=True) if w]
        device = state[0].device
        flat32 = torch.cat(narrow, 1) if narrow else torch.zeros(batch, 0, device=device)
        flat64 = (torch.cat(wide, 1) if wide
                  else torch.zeros(batch, 0, dtype=torch.float64, device=device))
        return flat32, flat64


class _Step(nn.Module):
    """The flat step of a template recurrence; functional_call swaps in a rate's tables."""

    def __init__(self, rec: nn.Module, layout: StateLayout) -> None:
        super().__init__()
        self.rec, self.layout = rec, layout

    def forward(self, u: torch.Tensor, flat32: torch.Tensor, flat64: torch.Tensor):
        y, state = self.rec.step(u, self.layout.split(flat32, flat64))
        return (y, *self.layout.join(state))


def tables(rec: nn.Module) -> dict[str, torch.Tensor]:
    """A recurrence's rate-dependent tensors (its buffers), named as in the template."""
    return {f"rec.{name}": buf for name, buf in rec.named_buffers()}


def inductor_available() -> bool:
    """torch.compile's CPU code generation needs a C++ compiler."""
    return shutil.which("g++") is not None or shutil.which("c++") is not None


class FusedStep:
    """`step(rec, u, flat32, flat64) -> (y, flat32', flat64')` for every rate of one network."""

    def __init__(self, template: nn.Module, layout: StateLayout) -> None:
        self.module = _Step(template, layout).eval()

        def run(buffers, u, flat32, flat64):
            return torch.func.functional_call(self.module, buffers, (u, flat32, flat64))

        # dynamic: one graph for every batch size (B=1 gets its own, specialised, graph)
        self._compiled = torch.compile(run, dynamic=True)

    def __call__(self, rec: nn.Module, u: torch.Tensor, flat32: torch.Tensor,
                 flat64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        buffers = getattr(rec, "_fused_tables", None)
        if buffers is None:
            buffers = rec._fused_tables = tables(rec)
        return self._compiled(buffers, u, flat32, flat64)
