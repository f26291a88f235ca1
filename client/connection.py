"""What streams and muxes share about their WebSocket: opening it, and reconnecting after a
drop with capped exponential backoff."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import quote

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from client.errors import StreamError
from client.wire import RETRY_CLOSE_CODES

T = TypeVar("T")
BACKOFF = (0.05, 2.0)  # first and longest wait between reconnects, seconds


async def open_ws(url: str, token: str | None, **options: Any) -> ClientConnection:
    """A connection with the key in the Authorization header and no per-message deflate (the
    server has none); a refusal before the upgrade is StreamError("http_<status>")."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return await connect(url, max_size=None, additional_headers=headers, compression=None,
                             **options)
    except InvalidStatus as exc:  # auth, Origin, no route
        status = exc.response.status_code
        raise StreamError(f"http_{status}", f"the server answered HTTP {status}") from None


def endpoint_url(url: str, model: str, endpoint: str, affinity: str | None) -> str:
    """ws(s)://.../v1/models/{model}/{endpoint}?session=<key>: the key a proxy in front of
    replicas hashes on (deploy/nginx/nginx.conf), a random one per connection if None, so
    that reconnects reach the replica that holds the sessions."""
    key = quote(affinity or secrets.token_urlsafe(12), safe="")
    return url.replace("http", "ws", 1).rstrip("/") + f"/v1/models/{model}/{endpoint}?session={key}"


def worth_reconnecting(ws: ClientConnection, reconnect: bool) -> bool:
    """After the connection ended: was it lost or closed in a way that a retry can mend?"""
    return reconnect and ws.close_code in RETRY_CLOSE_CODES | {None}


async def with_backoff(attempt: Callable[[], Awaitable[T]], max_s: float,
                       codes: frozenset[str]) -> T:
    """`attempt()` until it succeeds, waiting 0.05, 0.1, ... 2 s between tries; gives up
    after `max_s` seconds, or at once on a StreamError whose code is not in `codes`."""
    deadline = time.monotonic() + max_s
    delay = BACKOFF[0]
    while True:
        try:
            return await attempt()
        except (OSError, ConnectionClosed, TimeoutError, StreamError) as exc:
            if isinstance(exc, StreamError) and exc.code not in codes:
                raise
            if time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(2 * delay, BACKOFF[1])
