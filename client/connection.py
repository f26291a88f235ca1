"""What streams and muxes share about their WebSocket: opening it, reconnecting after a drop
with capped exponential backoff, and whether a resumed state lets a session go on."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from client.errors import StreamError
from client.wire import RETRY_CLOSE_CODES

T = TypeVar("T")
BACKOFF = (0.05, 2.0)  # first and longest wait between reconnects, seconds
# refusals a later try can get past: a server starting or draining, a proxy whose upstream is
# down, a connection lost before or during the handshake
RETRY_CODES = frozenset({"overloaded", "closed", "timeout", "not_ready", "draining",
                         "http_502", "http_503", "http_504"})


def base_url(url: str) -> str:
    """The http(s) base URL of a server given as http(s):// or ws(s)://; ValueError for
    anything else (a missing scheme or host, another protocol)."""
    parts = urlsplit(url.strip().rstrip("/"))
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not a server URL: {url!r} (expected http://HOST:PORT, https://, "
                         "ws:// or wss://)")
    return urlunsplit((scheme, parts.netloc, parts.path, "", ""))


async def open_ws(url: str, token: str | None, **options: Any) -> ClientConnection:
    """A connection with the key in the Authorization header and no per-message deflate (the
    server has none); a refusal before the upgrade is StreamError("http_<status>")."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return await connect(url, max_size=None, additional_headers=headers, compression=None,
                             **options)
    except InvalidStatus as exc:  # auth, Origin, no route; 502-504 from a proxy
        status = exc.response.status_code
        raise StreamError(f"http_{status}", f"the server answered HTTP {status}") from None
    except InvalidHandshake as exc:  # e.g. closed before the upgrade by a restarting server
        raise StreamError("closed", f"the handshake failed: {exc}") from None


async def open_stream(url: str, token: str | None, start: str, open_timeout: float,
                      ping_interval: float | None) -> tuple[ClientConnection, dict]:
    """A stream's connection and the server's `started` answer to `start`; a refusal or no
    answer within open_timeout is a StreamError, and leaves no socket open."""
    ws = await open_ws(url, token, open_timeout=open_timeout, ping_interval=ping_interval,
                       close_timeout=2)
    try:
        await ws.send(start)
        async with asyncio.timeout(open_timeout):
            reply = json.loads(await ws.recv())
        if reply.get("type") != "started":
            raise StreamError(reply.get("code", "bad_reply"), reply.get("message", str(reply)))
        return ws, reply
    except BaseException as exc:
        await asyncio.shield(ws.close())
        if isinstance(exc, ConnectionClosed):
            code = exc.rcvd.code if exc.rcvd is not None else 1006
            raise StreamError("closed", f"{code} before started", close_code=code) from None
        if isinstance(exc, TimeoutError):
            raise StreamError("timeout", "no started within open_timeout") from None
        raise


def can_replay_from(start: int, base: int, received: int, kept: Iterable[Any]) -> bool:
    """The server's state is at sample `start`: fine when it ends where our outputs do, or,
    when it is behind them (it came back from a checkpoint after the server was killed), when
    we still hold every frame since then (the recovery point `base`, and `kept`: the answered
    frames since, each with its first sample `t`) and one of them begins there."""
    if start == received:
        return True
    return base <= start < received and (start == base or any(f.t == start for f in kept))


def endpoint_url(url: str, model: str, endpoint: str, affinity: str | None) -> str:
    """ws(s)://.../v1/models/{model}/{endpoint}?session=<key>: the key a proxy in front of
    replicas hashes on (deploy/nginx/nginx.conf), a random one per connection if None, so
    that reconnects reach the replica that holds the sessions."""
    key = quote(affinity or secrets.token_urlsafe(12), safe="")
    return url.replace("http", "ws", 1).rstrip("/") + f"/v1/models/{model}/{endpoint}?session={key}"


def worth_reconnecting(ws: ClientConnection, reconnect: bool) -> bool:
    """After the connection ended: was it lost or closed in a way that a retry can mend? An
    idle session closed by the server (1008 idle_timeout) stays resumable too."""
    idle = ws.close_code == 1008 and ws.close_reason == "idle_timeout"
    return reconnect and (ws.close_code in RETRY_CLOSE_CODES | {None} or idle)


async def with_backoff(attempt: Callable[[], Awaitable[T]], max_s: float,
                       codes: frozenset[str] = RETRY_CODES) -> T:
    """`attempt()` until it succeeds, waiting 0.05, 0.1, ... 2 s between tries; gives up
    after `max_s` seconds (an attempt still running then is cut short), or at once on a
    StreamError whose code is not in `codes`."""
    deadline = time.monotonic() + max_s
    delay = BACKOFF[0]
    while True:
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.01)):
                return await attempt()
        except (OSError, ConnectionClosed, TimeoutError, StreamError) as exc:
            if isinstance(exc, StreamError) and exc.code not in codes:
                raise
            if time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(2 * delay, BACKOFF[1])
