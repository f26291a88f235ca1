"""Load-test settings, validated up front so a run is always bounded in size and time."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

# Hard ceilings: a typo must not turn a load test into a denial of service.
MAX_SESSIONS = 20_000
MAX_DURATION_S = 3_600.0
MAX_FRAME_SAMPLES = 1_000_000


def one_line(exc: ValidationError) -> str:
    """Pydantic's errors as one line a user reads: `field: what is wrong; ...`."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}"
                     for e in exc.errors(include_url=False))


WireFormat = Literal["float32", "int16", "json"]
SignalKind = Literal["sine", "noise", "npy"]


class StreamLoadConfig(BaseModel):
    """N concurrent WebSocket sessions, each streaming `rate` samples/s in frames of T."""

    url: str = Field(description="server base URL, e.g. http://127.0.0.1:8000")
    model: str
    sessions: int = Field(1, ge=1, le=MAX_SESSIONS)
    rate: float = Field(100.0, gt=0, description="samples per second per session")
    frame: int = Field(1, ge=1, le=MAX_FRAME_SAMPLES, description="samples per frame (T)")
    wire: WireFormat = "float32"
    signal: SignalKind = "sine"
    npy_path: str | None = None
    ramp_s: float = Field(1.0, ge=0, le=MAX_DURATION_S)
    hold_s: float = Field(5.0, gt=0, le=MAX_DURATION_S)
    drain_s: float = Field(10.0, gt=0, le=300, description="wait for late replies after sending")
    sample_rate: float | None = Field(None, gt=0, description="session sample rate (Hz)")
    verify_sessions: int = Field(2, ge=0, description="sessions checked by predict")
    verify_max_samples: int = Field(4096, ge=1, description="prefix length checked by predict")
    tolerance: float = Field(1e-4, gt=0)
    max_in_flight: int = Field(10_000, ge=1, description="per-session unanswered frames cap")
    workers: int = Field(1, ge=1, le=64, description="client processes sharing the sessions")
    engine: Literal["auto", "raw", "client"] = Field(
        "auto", description="raw: every session of a process on one lean WebSocket client "
        "and one send timer (binary wires, ws://); client: one AsyncStream of the client "
        "library per session; auto: raw where it applies")
    scrape_interval_s: float = Field(1.0, gt=0)
    allow_remote: bool = False
    ready_timeout_s: float = Field(60.0, gt=0, le=600, description="wait for /readyz")
    seed: int = 0
    token: str | None = Field(None, description="API key sent as a Bearer header")

    @model_validator(mode="after")
    def _check(self) -> StreamLoadConfig:
        if self.signal == "npy" and not self.npy_path:
            raise ValueError("signal 'npy' needs npy_path (a .npy file of the input signal)")
        if self.ramp_s + self.hold_s + self.drain_s > MAX_DURATION_S:
            raise ValueError(f"ramp + hold + drain exceeds the {MAX_DURATION_S:.0f} s ceiling")
        return self

    @property
    def frame_period_s(self) -> float:
        return self.frame / self.rate


class PredictLoadConfig(BaseModel):
    """Concurrent POST predict calls of `batch` sequences of `length` samples each."""

    url: str
    model: str
    batch: int = Field(1, ge=1, le=4096)
    length: int = Field(1000, ge=1, le=10_000_000)
    concurrency: int = Field(1, ge=1, le=1024)
    duration_s: float = Field(5.0, gt=0, le=MAX_DURATION_S)
    max_requests: int = Field(100_000, ge=1)
    body: Literal["npy", "json"] = "npy"
    signal: SignalKind = "sine"
    npy_path: str | None = None
    timeout_s: float = Field(120.0, gt=0)
    allow_remote: bool = False
    seed: int = 0
    token: str | None = None
