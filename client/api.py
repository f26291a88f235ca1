"""HTTP calls (models, predict) and the entry points for streams, async and sync."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import numpy as np

from client.connection import base_url
from client.errors import ClientError
from client.mux import AsyncMux
from client.stream import AsyncStream, StreamOptions
from client.wire import from_int16

T = TypeVar("T")
NPY = "application/x-npy"


@dataclass
class PredictResult:
    outputs: np.ndarray  # (batch, length or 1, d_output) float32
    labels: list[str] | None
    state: list[str] | None  # state blobs, with return_state
    device: str
    timing_ms: dict


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        code, message = error["code"], error["message"]
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:200]
    raise ClientError(response.status_code, code, message)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class AsyncClient:
    """`async with AsyncClient(url, token=...) as c`: models(), model(), predict(), stream()."""

    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None,
                 timeout: float = 120.0, max_connections: int = 100) -> None:
        self.url = base_url(url)
        self.token = token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout,
                                       limits=httpx.Limits(max_connections=max_connections))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def models(self) -> list[dict]:
        response = await self._http.get("/v1/models")
        _raise_for(response)
        return response.json()["models"]

    async def model(self, name: str) -> dict:
        response = await self._http.get(f"/v1/models/{name}")
        _raise_for(response)
        return response.json()

    async def predict(self, model: str, inputs: np.ndarray, *, sample_rate: float | None = None,
                      outputs: str = "all", return_state: bool = False,
                      state: list[str] | None = None, binary: bool = True) -> PredictResult:
        """Whole sequences (batch, length, d_input) through the convolutional view. `binary`
        sends .npy and gets .npy back (no JSON float round trip), except with `state`, which
        only JSON carries; the state blobs of `return_state` come back in JSON."""
        array = np.asarray(inputs)
        if array.dtype != np.int16:
            array = array.astype(np.float32, copy=False)
        elif not binary or state is not None or return_state:  # JSON has no int16: scale
            array = from_int16(array)
        path = f"/v1/models/{model}/predict"
        if binary and state is None and not return_state:  # int16 goes as it is
            params = {"outputs": outputs}
            if sample_rate is not None:
                params["sample_rate"] = sample_rate
            response = await self._http.post(
                path, content=_npy(array), params=params,
                headers={"Content-Type": NPY, "Accept": NPY})
            _raise_for(response)
            result = np.load(io.BytesIO(response.content), allow_pickle=False)
            return PredictResult(result, None, None, response.headers.get("x-device", ""), {})
        body: dict[str, Any] = {"inputs": array.tolist(), "outputs": outputs,
                                "return_state": return_state, "state": state}
        if sample_rate is not None:
            body["sample_rate"] = sample_rate
        response = await self._http.post(path, json=body)
        _raise_for(response)
        data = response.json()
        return PredictResult(np.asarray(data["outputs"], dtype=np.float32), data.get("labels"),
                             data.get("state"), data.get("device", ""), data.get("timing_ms", {}))

    def stream(self, model: str, *, dtype: str = "float32", sample_rate: float | None = None,
               output: str = "every", state: str | None = None, resume: str | None = None,
               reconnect: bool = True, checkpoint_s: float = 2.0,
               max_reconnect_s: float = 60.0, frames: str = "binary",
               affinity: str | None = None, open_timeout: float = 30.0,
               ping_interval: float | None = 20.0) -> AsyncStream:
        """A streaming session (`async with`). With `reconnect`, a dropped connection is
        resumed with backoff and the frames the server has not applied are replayed.
        `affinity` is the key a proxy in front of replicas hashes on (default: random);
        `open_timeout` bounds each connection's handshake and `started`, `ping_interval` is
        the keepalive (None: off)."""
        options = StreamOptions(dtype, sample_rate, output, state, resume, reconnect,
                                checkpoint_s, max_reconnect_s, frames, open_timeout,
                                ping_interval, affinity)
        return AsyncStream(self.url, model, options, self.token)


    def mux(self, model: str, *, reconnect: bool = True, checkpoint_s: float = 2.0,
            max_reconnect_s: float = 60.0, affinity: str | None = None) -> AsyncMux:
        """Many sessions of `model` over one connection (`async with`). With `reconnect`, a
        dropped connection is resumed session by session, as for stream(). `affinity` as
        for stream()."""
        return AsyncMux(self.url, model, self.token, reconnect=reconnect,
                        checkpoint_s=checkpoint_s, max_reconnect_s=max_reconnect_s,
                        affinity=affinity)


class Client:
    """The synchronous client: the same calls, run on a private event loop thread."""

    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None,
                 timeout: float = 120.0) -> None:
        base_url(url)  # a bad URL is refused before the loop thread starts
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="s4serve-client")
        self._thread.start()
        self._async = self._run(self._make(url, token, timeout))

    @staticmethod
    async def _make(url: str, token: str | None, timeout: float) -> AsyncClient:
        return AsyncClient(url, token, timeout)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:  # Ctrl-C: the call must not go on and take a later reply
            future.cancel()
            raise

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._async.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def models(self) -> list[dict]:
        return self._run(self._async.models())

    def model(self, name: str) -> dict:
        return self._run(self._async.model(name))

    def predict(self, model: str, inputs: np.ndarray, **options: Any) -> PredictResult:
        return self._run(self._async.predict(model, inputs, **options))

    def stream(self, model: str, **options: Any) -> Stream:
        return Stream(self._async.stream(model, **options), self._run)

    def mux(self, model: str, **options: Any) -> Mux:
        """Many sessions over one connection (`with client.mux(name) as m`), as AsyncMux."""
        return Mux(self._async.mux(model, **options), self._run)


class _SyncFace:
    """What the synchronous faces share: the asyncio object they drive, the client's loop."""

    def __init__(self, inner: Any, run: Callable[[Any], Any]) -> None:
        self._inner, self._run = inner, run

    @property
    def reconnects(self) -> int:
        return self._inner.reconnects

    def close(self) -> None:
        self._run(self._inner.close())


class Stream(_SyncFace):
    """The synchronous face of AsyncStream (used by `Client.stream`)."""

    @property
    def info(self) -> dict:
        return self._inner.info

    @property
    def replayed(self) -> int:
        """Samples sent again after resuming from a state behind the outputs received."""
        return self._inner.replayed

    def __enter__(self) -> Stream:
        self._run(self._inner.open())
        return self

    def __exit__(self, *exc: object) -> None:
        self._run(self._inner.__aexit__(*exc))

    def feed(self, frame: np.ndarray) -> None:
        self._run(self._inner.feed(frame))

    def recv(self) -> np.ndarray:
        return self._run(self._inner.recv())

    def send(self, frame: np.ndarray) -> np.ndarray:
        return self._run(self._inner.send(frame))

    def snapshot(self) -> tuple[int, str]:
        return self._run(self._inner.snapshot())

    def reset(self) -> None:
        self._run(self._inner.reset())

    def end(self) -> int:
        return self._run(self._inner.end())


class Mux(_SyncFace):
    """The synchronous face of AsyncMux (used by `Client.mux`)."""

    @property
    def sessions(self) -> dict[int, dict]:
        return self._inner.sessions

    def __enter__(self) -> Mux:
        self._run(self._inner.__aenter__())
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self, **options: Any) -> int:
        return self._run(self._inner.open(**options))

    def send(self, frames: dict[int, np.ndarray]) -> dict[int, Any]:
        return self._run(self._inner.send(frames))

    def snapshot(self, sid: int) -> tuple[int, str]:
        return self._run(self._inner.snapshot(sid))

    def reset(self, sid: int) -> None:
        self._run(self._inner.reset(sid))

    def end(self, sid: int) -> int:
        return self._run(self._inner.end(sid))

    def detach(self, sid: int) -> int:
        return self._run(self._inner.detach(sid))
