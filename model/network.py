"""The network: encoder -> residual S4/S4D blocks -> decoder, with three equivalent views.

Classification is causal: logits at sample t come from the running mean of the features over
samples 0..t, so a stream reports a prediction at every sample and the last one equals the
usual mean-pooled classifier.
"""

from __future__ import annotations

import math
import threading
import warnings
from concurrent.futures import Executor

import torch
import torch.nn.functional as F
from cachetools import LRUCache
from torch import nn

from model.config import ModelConfig
from model.ssm import S4DLayer, S4Layer, SSMLayer

# The tracer notes that the traced step returns a list (its state), as intended. Filtered here,
# once, not in warnings.catch_warnings(): that swaps the process-wide filters, and models load
# in a worker thread while FastAPI on the event loop may do the same (the two can interleave and
# leave every warning of the process silenced, or show warnings FastAPI meant to hide).
warnings.filterwarnings("ignore", message="Encountering a list at the output of the tracer",
                        category=torch.jit.TracerWarning)

State = list[torch.Tensor]
RECURRENT_CACHE_SIZE = 4


def check_input(u: torch.Tensor, d_input: int, name: str = "inputs") -> None:
    """Raise ValueError naming what is wrong with a (B, L, d_input) input."""
    if u.dim() != 3 or u.shape[-1] != d_input:
        raise ValueError(f"{name} must have shape (batch, length, {d_input}), got "
                         f"{tuple(u.shape)}")
    if u.shape[0] < 1 or u.shape[1] < 1:
        raise ValueError(f"{name} must hold at least one sample, got shape {tuple(u.shape)}")
    if not torch.isfinite(u).all():
        raise ValueError(f"{name} contain NaN or Inf")


MEAN_BLOCK = 256


def running_mean(x: torch.Tensor) -> torch.Tensor:
    """(B, L, H) -> the mean of samples 0..t at every t, in x's dtype.

    Sums run in x's dtype within blocks of MEAN_BLOCK samples and in float64 across blocks,
    so a float32 mean over 16000 samples stays within a few float32 ulps of the float64 one
    without a float64 copy of the whole activation (2.2-2.4x faster at B=64, L=16000, H=32)."""
    b, length, h = x.shape
    count = torch.arange(1, length + 1, dtype=x.dtype, device=x.device)[:, None]  # (L, 1)
    if x.dtype == torch.float64 or length <= MEAN_BLOCK:
        return torch.cumsum(x, dim=1, dtype=torch.float64).to(x.dtype) / count
    pad = -length % MEAN_BLOCK
    blocks = F.pad(x, (0, 0, 0, pad)).view(b, -1, MEAN_BLOCK, h)  # (B, nb, T, H)
    inner = blocks.cumsum(2)  # (B, nb, T, H) within each block
    before = inner[:, :, -1].to(torch.float64).cumsum(1) - inner[:, :, -1]  # (B, nb, H)
    sums = (inner + before.to(x.dtype)[:, :, None]).view(b, -1, h)[:, :length]  # (B, L, H)
    return sums / count


class NotStreamable(ValueError):
    """The network has no recurrent form (bidirectional layers)."""


class ResidualBlock(nn.Module):
    """Norm (pre or post), an SSM layer, dropout and the residual connection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.prenorm, self.residual = config.prenorm, config.residual
        if config.layer == "s4":
            self.layer: SSMLayer = S4Layer(config.d_model, config.d_state, config.rank,
                                           config.dt_min, config.dt_max, config.dropout,
                                           config.channels)
        else:
            self.layer = S4DLayer(config.d_model, config.d_state, config.init, config.disc,
                                  config.dt_min, config.dt_max, config.dropout, config.bandlimit,
                                  config.channels, config.bidirectional)
        norm = config.norm == "layer"
        self.norm = nn.LayerNorm(config.d_model) if norm else nn.Identity()
        self.dropout = nn.Dropout(config.dropout)

    def around(self, x: torch.Tensor, ssm, owned: bool = False) -> torch.Tensor:
        """The block with `ssm` standing for the layer's view (conv, step or chunk). `owned`:
        ssm's output is a new tensor that nothing else holds, so the residual sum may go
        into it (one large tensor fewer per layer in the conv view without autograd)."""
        z = self.norm(x) if self.prenorm else x
        z = self.dropout(ssm(z))
        if not self.residual:
            return z if self.prenorm else self.norm(z)
        x = z.add_(x) if owned else x + z
        return x if self.prenorm else self.norm(x)

    def forward(self, x: torch.Tensor, rate: float = 1.0) -> torch.Tensor:
        return self.around(x, lambda z: self.layer(z, rate), owned=not torch.is_grad_enabled())


class S4Network(nn.Module):
    """Encoder -> n_layers residual blocks -> decoder (per-step or causal running-mean head)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = (nn.Linear(config.d_input, config.d_model) if config.encoder
                        else nn.Identity())
        self.blocks = nn.ModuleList(ResidualBlock(config) for _ in range(config.n_layers))
        self.decoder = (nn.Linear(config.d_model, config.d_output) if config.decoder
                        else nn.Identity())
        self._recurrent_lock = threading.Lock()
        # rates kept by `recurrent` (LRU)
        self._recurrent_cache: LRUCache = LRUCache(RECURRENT_CACHE_SIZE)

    @property
    def recurrent_cache_size(self) -> int:
        return int(self._recurrent_cache.maxsize)

    @recurrent_cache_size.setter
    def recurrent_cache_size(self, size: int) -> None:
        with self._recurrent_lock:
            self._recurrent_cache = LRUCache(size)

    def __getstate__(self) -> dict:
        # copies and pickles carry the parameters, not the derived recurrent forms or the lock
        state = super().__getstate__()
        state = {k: v for k, v in state.items() if k != "_recurrent_lock"}
        state["_recurrent_cache"] = self._recurrent_cache.maxsize
        return state

    def __setstate__(self, state: dict) -> None:
        state = {**state, "_recurrent_cache": LRUCache(state["_recurrent_cache"])}
        super().__setstate__(state)
        self._recurrent_lock = threading.Lock()

    @property
    def pooled(self) -> bool:
        return self.config.task == "classification"

    def features(self, u: torch.Tensor, rate: float = 1.0) -> torch.Tensor:
        """(B, L, d_input) -> (B, L, d_model), the output of the last block."""
        x = self.encoder(u)
        for block in self.blocks:
            x = block(x, rate)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Features (B, L, d_model) -> outputs (B, L, d_output); causal running mean if pooled."""
        if self.pooled:
            x = running_mean(x)
        return self.decoder(x)

    def forward(self, u: torch.Tensor, rate: float = 1.0) -> torch.Tensor:
        """The convolutional view: (B, L, d_input) -> (B, L, d_output)."""
        if u.dim() != 3 or u.shape[-1] != self.config.d_input:
            raise ValueError(f"inputs must have shape (batch, length, {self.config.d_input}), "
                             f"got {tuple(u.shape)}")
        return self.head(self.features(u, rate))

    def final(self, u: torch.Tensor, rate: float = 1.0) -> torch.Tensor:
        """Outputs at the last sample only, (B, d_output): `self(u, rate)[:, -1]` without the
        running mean over every step (what training and scoring need)."""
        x = self.features(u, rate)  # (B, L, d_model)
        last = x.to(torch.float64).mean(1).to(x.dtype) if self.pooled else x[:, -1]  # (B, H)
        return self.decoder(last)

    def to_recurrent(self, rate: float = 1.0, chunk_max: int | None = None) -> RecurrentNetwork:
        """Discretise every layer once at this rate and return the recurrent form."""
        if not 0 < rate < math.inf:  # NaN too
            raise ValueError(f"rate must be a positive finite number, got {rate}")
        if self.config.bidirectional:
            raise NotStreamable(f"model {self.config.name!r} has bidirectional layers: each "
                                "output reads future samples, so it has no recurrent form; "
                                "whole sequences only (predict without state)")
        return RecurrentNetwork(self, rate, chunk_max or self.config.chunk_max)

    def recurrent(self, rate: float = 1.0) -> RecurrentNetwork:
        """`to_recurrent(rate)`, cached for the last few rates until a parameter changes.
        Thread-safe: a server's step thread and predict worker share the cache."""
        version = tuple((p.data_ptr(), p._version) for p in self.parameters())
        with self._recurrent_lock:
            key = (float(rate), version)
            if key not in self._recurrent_cache:
                self._recurrent_cache[key] = self.to_recurrent(rate)
            return self._recurrent_cache[key]

    def conv_bytes(self, length: int) -> int:
        """Peak bytes of the convolutional view per sequence of this length (float32): the
        padded signal, its spectrum and the inverse FFT's full output (n_fft numbers each)
        plus about eight (L, H) activations of a block (input, norm, linear 2H, GLU, sum).
        Two passes of the 4 × 128 reference network side by side peaked at 253 MB over start
        against an estimated 2 × 99 MB when two n_fft terms were counted (three: 2 × 116)."""
        from model.kernels import fft_size

        h = self.config.channels * self.config.d_model
        return 4 * (3 * fft_size(length) * h + 8 * length * self.config.d_model)

    @torch.no_grad()
    def predict(self, u: torch.Tensor, rate: float = 1.0, state: State | None = None,
                return_state: bool = False, last: bool = False,
                max_batch: int | None = None, pool: Executor | None = None,
                out: torch.Tensor | None = None) -> tuple[torch.Tensor, State | None]:
        """Whole sequences: the conv view, or the exact chunked recurrence when a state is
        given or asked for. `last`: only each sequence's final output, (B, 1, d_output).
        `max_batch`: the conv view runs that many sequences at a time, which bounds memory
        (see `conv_bytes`) and keeps the working set in cache; `pool`: its threads run those
        pieces side by side; `out`: where the conv view writes its outputs (B, L|1, d_output)."""
        check_input(u, self.config.d_input)
        if state is None and not return_state:
            size = max(1, max_batch or u.shape[0])
            return self._in_pieces(u, rate, last, size, pool, out), None
        rec = self.recurrent(rate)
        if state is None:
            state = rec.initial_state(u.shape[0])
        rec.check_state(state, u.shape[0])
        return rec.chunk(u, state)

    def _in_pieces(self, u: torch.Tensor, rate: float, last: bool, size: int,
                   pool: Executor | None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The conv view `size` sequences at a time, written into one output (`out` if given:
        no concatenation holding every piece twice). With a pool and more than one pass,
        every pass runs on its threads (their conv buffers are theirs, kept between requests)
        and the first runs alone: it fills the kernel cache that the others then only read."""
        batch = u.shape[0]
        inference = torch.is_inference_mode_enabled()

        def piece(i: int, out: torch.Tensor | None = None) -> torch.Tensor | None:
            with torch.inference_mode(inference), torch.no_grad():  # both are per thread
                x = u[i:i + size]  # (b, L, d_input)
                y = self.final(x, rate)[:, None] if last else self(x, rate)  # (b, L|1, O)
                if out is None:
                    return y
                out[i:i + size] = y  # no future holds a piece's outputs
                return None

        starts = range(0, batch, size)
        if out is None and size >= batch:  # one pass: no hand-over to another thread
            return piece(0)
        if out is None or (pool is not None and len(starts) > 1):
            first = piece(0) if pool is None else pool.submit(piece, 0, out).result()
            if out is None:
                out = first.new_empty((batch, *first.shape[1:]))  # (B, L|1, d_output)
                out[:size] = first
            starts = starts[1:]
        outs = [out] * len(starts)
        inline = pool is None or len(starts) < 2
        for _ in map(piece, starts, outs) if inline else pool.map(piece, starts, outs):
            pass  # map runs them and re-raises the first error
        return out


class RecurrentNetwork(nn.Module):
    """The network in recurrent form: per-sample `step` and block `chunk` on explicit state.

    State layout (each tensor batch first): for every block, real and imaginary parts
    (B, H, N2) in float32; for classification, the running feature sum (B, d_model) and the
    sample count (B, 1), both float64 so long streams keep their mean exact.
    """

    def __init__(self, net: S4Network, rate: float, chunk_max: int) -> None:
        super().__init__()
        self.config, self.rate = net.config, rate
        self.encoder, self.decoder, self.pooled = net.encoder, net.decoder, net.pooled
        self.blocks = nn.ModuleList(net.blocks)
        with torch.no_grad():
            self.layers = nn.ModuleList(b.layer.recurrence(rate, chunk_max) for b in net.blocks)
        h, n2 = self.config.channels * self.config.d_model, self.config.d_state // 2
        spec = []
        for i in range(len(self.layers)):
            spec += [(f"layer{i}.re", (h, n2), torch.float32),
                     (f"layer{i}.im", (h, n2), torch.float32)]
        if self.pooled:  # the blocks' outputs: d_model features (channels mix inside a block)
            spec += [("pool.sum", (self.config.d_model,), torch.float64),
                     ("pool.count", (1,), torch.float64)]
        self.state_spec: list[tuple[str, tuple[int, ...], torch.dtype]] = spec
        self._compiled: dict[str, object] = {}
        self.eval()

    @property
    def state_bytes(self) -> int:
        return sum(torch.Size(s).numel() * d.itemsize for _, s, d in self.state_spec)

    def initial_state(self, batch: int, device: torch.device | str = "cpu") -> State:
        return [torch.zeros(batch, *s, dtype=d, device=device) for _, s, d in self.state_spec]

    def check_state(self, state: State, batch: int) -> None:
        if len(state) != len(self.state_spec):
            raise ValueError(f"state has {len(state)} tensors, expected {len(self.state_spec)}")
        for x, (name, shape, dtype) in zip(state, self.state_spec, strict=True):
            if tuple(x.shape) != (batch, *shape) or x.dtype != dtype:
                raise ValueError(f"state tensor {name} must be {dtype} of shape "
                                 f"{(batch, *shape)}, got {x.dtype} {tuple(x.shape)}")

    def _run(self, x: torch.Tensor, state: State, view: str) -> tuple[torch.Tensor, State]:
        new_state: State = []
        for i, (block, layer) in enumerate(zip(self.blocks, self.layers, strict=True)):
            xr, xi = state[2 * i], state[2 * i + 1]
            out: list[torch.Tensor] = []

            def ssm(z, layer=layer, xr=xr, xi=xi, out=out):
                y, nr, ni = getattr(layer, view)(z, xr, xi)
                out += [nr, ni]
                return y

            x = block.around(x, ssm)
            new_state += out
        return x, new_state

    def compiled_step(self, compiler: str = "torchscript"):
        """`step` compiled once (same numbers, dynamic batch). At small batches Python dispatch
        dominates a step: "torchscript" (a frozen traced graph) removes most of it at no
        start-up cost; "inductor" (torch.compile) also fuses the memory-bound elementwise work
        into generated C++ (about 20 s to compile per rate, needs a C++ compiler)."""
        if compiler not in self._compiled:
            view = _StepView(self).eval()
            if compiler == "torchscript":
                example = (torch.zeros(2, self.config.d_input), self.initial_state(2))
                with torch.inference_mode(False), torch.no_grad():
                    traced = torch.jit.trace(view, example, check_trace=False)
                    self._compiled[compiler] = torch.jit.freeze(traced)
            elif compiler == "inductor":
                self._compiled[compiler] = torch.compile(view, dynamic=True)
            elif compiler == "eager":
                self._compiled[compiler] = self.step
            else:
                raise ValueError(f"unknown step compiler {compiler!r}: expected torchscript, "
                                 "inductor or eager")
        return self._compiled[compiler]

    @torch.no_grad()
    def step(self, u: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """u (B, d_input) -> y (B, d_output), new state."""
        x, new_state = self._run(self.encoder(u), state, "step")  # (B, d_model)
        if self.pooled:
            total = state[-2] + x.to(torch.float64)  # (B, d_model)
            count = state[-1] + 1  # (B, 1)
            new_state += [total, count]
            x = (total / count).to(u.dtype)
        return self.decoder(x), new_state

    @torch.no_grad()
    def chunk(self, u: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """u (B, T, d_input) -> y (B, T, d_output), state after the block."""
        x, new_state = self._run(self.encoder(u), state, "chunk")  # (B, T, d_model)
        if self.pooled:
            sums = state[-2][:, None] + torch.cumsum(x.to(torch.float64), dim=1)  # (B, T, H)
            steps = torch.arange(1, x.shape[1] + 1, dtype=torch.float64, device=x.device)
            counts = state[-1][:, None] + steps[None, :, None]  # (B, T, 1)
            new_state += [sums[:, -1], counts[:, -1]]
            x = (sums / counts).to(u.dtype)
        return self.decoder(x), new_state


class _StepView(nn.Module):
    """`RecurrentNetwork.step` as a module, for tracing."""

    def __init__(self, rec: RecurrentNetwork) -> None:
        super().__init__()
        self.rec = rec

    def forward(self, u: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        return self.rec.step(u, state)
