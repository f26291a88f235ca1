"""Server settings: environment variables `S4SERVE_*`, overridable by CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_ZOO = Path(__file__).resolve().parent.parent / "model" / "zoo"


def _split_csv(value: object) -> object:
    # Env vars hold lists as comma-separated text; JSON lists work too.
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


# the backends server/backends registers (a Literal, so a typo fails when settings are read)
BackendName = Literal["torch", "torch-inductor", "onnx"]


class Settings(BaseSettings):
    """Every knob of the server. Sizes are bytes, times are seconds."""

    # an empty variable (FOO= in a compose file) means "not set", not "" or Path(".")
    model_config = SettingsConfigDict(env_prefix="S4SERVE_", extra="ignore", env_ignore_empty=True)

    host: str = "127.0.0.1"
    workers: int = Field(
        0, ge=0, description="server processes sharing the port (0: one per CPU core)"
    )
    worker_id: int = Field(0, ge=0, description="set by the supervisor for each worker")
    run_dir: Path | None = Field(
        None, description="set by the supervisor: what the workers share (metrics, readiness, "
        "handoff sockets)"
    )
    port: int = Field(8000, ge=0, le=65535)
    models: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="model directories; empty means every one in zoo_dir"
    )
    zoo_dir: Path = DEFAULT_ZOO
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="auto, cpu, cuda or cuda:N")
    backend: BackendName = Field("torch", description="default backend for every model")
    backends: dict[str, BackendName] = Field(default_factory=dict,
                                             description="per-model overrides")
    step_compiler: Literal["auto", "native", "aoti", "inductor", "torchscript"] = Field(
        "auto", description="torch backend: the streaming step as one compiled step for every "
        "rate: the C step of S4D networks, compiled once and kept in compile_cache (native), "
        "an AOTInductor package built once and kept in compile_cache (aoti), or a "
        "torch.compile graph compiled when the model loads (inductor); or a TorchScript graph "
        "per rate. auto: native for S4D networks on the CPU with a C compiler, else aoti when "
        "a C++ compiler is installed"
    )
    compile_cache: Path = Field(
        Path("var/compiled"), description="where compiled step packages are kept, named by a "
        "fingerprint of the model, the code and the machine (built when missing)"
    )
    onnx_cache: Path | None = Field(
        None, description="onnx backend: where graphs exported at load time are kept "
        "(None: ~/.cache/s4serve/onnx)")
    onnx_threads: int = Field(
        0, ge=0, description="onnx backend: intra-op threads per onnxruntime session (0: "
        "onnxruntime's choice, the physical cores)")

    max_sessions: int = Field(1000, ge=1, description="concurrent streaming sessions")
    max_frame_bytes: int = Field(1 << 20, ge=64, description="largest WebSocket message")
    idle_timeout: float = Field(300.0, gt=0, description="close a silent session after this")
    resume_ttl: float = Field(60.0, ge=0, description="keep a dropped session this long")
    reply_ring_bytes: int = Field(
        32768, ge=0, description="a session's last replies kept (bytes) and sent again to a "
        "client that resumes with `received` below what was sent; 0: none kept"
    )
    replica_handoff_wait: float = Field(
        0.5, ge=0, description="with a Redis store: how long a resume of a session live on "
        "another replica waits for that replica to let go of it"
    )
    resume_wait: float = Field(
        1.0, ge=0, description="a resume whose token is not (yet) stored waits this long for "
        "it, e.g. for the detach of a connection that dropped a moment ago, before "
        "`resume_not_found`"
    )
    session_queue: int = Field(
        16, ge=1, description="frames in flight per session (per mux connection: messages); "
        "with many sessions per worker "
        "this sets the backlog a tick must work through once the server is pressed (measured, "
        "2 workers, 1000 per-sample sessions: at 64, ~32k frames queued per worker took over "
        "max_lag to drain and new frames were refused; at 16, none were)")
    session_queue_kb: int = Field(
        4096, ge=1, description="KiB of samples (as float32) in flight per session: reading "
        "pauses at this or at session_queue frames, whichever comes first (one frame always "
        "goes in), so big frames cannot take the model's whole queue"
    )
    pressed_queue: int = Field(
        2, ge=1, description="frames in flight per session while the server is under pressure "
        "(press_lag): the rest wait in the client's socket (TCP backpressure), so every session "
        "keeps its share and no work goes into answering 'overloaded'"
    )
    press_lag: float = Field(
        0.1, gt=0, description="when the oldest waiting frame is older than this, sessions "
        "are read pressed_queue frames at a time"
    )
    mux_max_sessions: int = Field(1024, ge=1, description="sessions per mux connection")
    mux_max_entries: int = Field(4096, ge=1, description="entries per mux data message")
    max_body_bytes: int = Field(64 << 20, ge=1, description="largest predict request body")
    body_timeout: float = Field(
        60.0, gt=0, description="a predict upload that sends no bytes for this many seconds "
        "is answered 408 body_timeout (a stalled upload holds a place among "
        "max_pending_requests)")
    max_batch_length: int = Field(4_000_000, ge=1, description="largest batch × length")
    max_json_values: int = Field(
        16_000_000, ge=1, description="most numbers in a JSON predict answer's outputs (413 "
        "beyond: an .npy answer, or outputs=last, is not limited by it)")
    max_pending_requests: int = Field(
        64, ge=1, description="predict requests in the server at once, from the start of their "
        "upload to the end of their answer (503 overloaded beyond)")
    predict_workers: int = Field(
        1, ge=0, description="processes that parse, compute and encode predict requests (0: a "
        "thread of the server, with no time limit)")
    predict_memory_mb: int = Field(
        256, ge=1, description="working memory of a predict worker's convolutional passes "
        "together: a batch is run a few sequences at a time so that the estimated peaks "
        "(model conv_bytes) of the passes in flight stay within it; sequences above it run "
        "along time, in blocks through the chunked recurrence (bidirectional models: whole)")
    predict_pass_mb: int = Field(
        32, ge=1, description="working set of one convolutional pass: as many sequences as "
        "fit it go together (fewer calls), no more (a pass out of the caches is slower per "
        "sequence)")
    predict_threads: int = Field(
        0, ge=0, description="threads of one predict worker that run a batch's conv passes "
        "side by side on CPU (0: the usable cores shared among predict_workers)")
    predict_nice: int = Field(
        5, ge=0, le=19, description="niceness of the predict worker processes: the streams' "
        "steps come first when both want the cores")
    predict_timeout: float = Field(
        60.0, gt=0, description="seconds a predict request may compute before its worker is "
        "stopped and the answer is 504 timeout (with predict_workers >= 1)")
    max_rates: int = Field(8, ge=1, description="distinct sample rates kept discretised")
    torch_threads: int = Field(
        1, ge=0, description="torch intra-op threads (0: torch's default); the step thread and "
        "the predict worker run side by side, and small steps only lose from more threads"
    )

    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False)
    state_secret: SecretStr | None = Field(
        None, description="signs the state blobs the server issues (HMAC-SHA256); when set, "
        "only blobs it signed are accepted. Every worker and replica needs the same one")
    docs_public: bool = Field(
        False, description="with api_keys set, /docs and /openapi.json are served without a "
        "key only when this is true (without api_keys they are always public)")
    probes_public: bool = Field(
        False, description="with api_keys set, /healthz, /readyz and /metrics are served without "
        "a key only when this is true (for probes and scrapers that cannot send a header)")
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    snapshot_dir: Path = Path("var/sessions")
    store: str | None = Field(
        None, description="where dropped sessions wait: None for the local directory "
        "(snapshot_dir), or redis://host:port/db, shared by every worker and replica")
    checkpoint_interval: float = Field(
        1.0, ge=0, description="every this many seconds the state of each live session that "
        "advanced goes to the store, so a resume after a SIGKILL continues from there (0: off)")
    checkpoint_samples: int = Field(
        1, ge=1, description="a live session is checkpointed only once it advanced at least "
        "this many samples since its last checkpoint")
    drain_seconds: float = Field(
        0.0, ge=0, description="after SIGTERM, answer readyz 503 this long before stopping"
    )
    scheduler_tick: float = Field(
        0.0, ge=0, description="extra wait for more frames before each batched call"
    )
    scheduler_max_batch: int = Field(1024, ge=1, description="sessions per batched call")
    tick_samples: int = Field(
        256, ge=1, description="most samples of one frame computed per round: a longer frame "
        "takes several rounds (equal pieces), so one client's big frames cannot hold up the "
        "others"
    )
    max_queued_frames: int = Field(
        65536, ge=1, description="frames queued per model before new ones are answered "
        "'overloaded'"
    )
    max_queued_mb: int = Field(
        256, ge=1, description="MiB of samples (as float32) queued per model before new "
        "frames are answered 'overloaded': with max_frame_bytes, what bounds queued memory"
    )
    max_lag: float = Field(
        1.0, gt=0, description="when the oldest waiting frame is older than this, new frames "
        "are answered 'overloaded' and new sessions refused (1013) until it recovers"
    )

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    json_logs: bool = False

    @field_validator("models", "api_keys", "allowed_origins", mode="before")
    @classmethod
    def _lists_from_env(cls, value: object) -> object:
        return _split_csv(value)

    def backend_for(self, model_name: str) -> str:
        return self.backends.get(model_name, self.backend)

    @property
    def secret(self) -> str | None:
        return self.state_secret.get_secret_value() if self.state_secret else None

    def model_dirs(self) -> list[Path]:
        """The configured model directories, or every model found under the zoo."""
        if self.models:
            return list(self.models)
        if not self.zoo_dir.is_dir():
            return []
        return sorted(p.parent for p in self.zoo_dir.glob("*/config.json"))
