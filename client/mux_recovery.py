"""A mux session's client-side bookkeeping and its recovery on a new connection: the recovery
point, the entries answered since, and how a session is reopened after a drop."""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass, field

from websockets.asyncio.client import ClientConnection

from client.errors import StreamError


@dataclass(eq=False)
class Entry:
    t: int  # session index of its first sample
    payload: bytes
    samples: int
    deliver: bool = True  # False: a replay whose outputs the caller already has


@dataclass(eq=False)
class Session:
    options: dict  # what `open` asked for (dtype, sample_rate, output)
    token: str
    base: tuple[int, str | None]  # recovery point: (samples, state blob)
    sent: int  # session index of the next entry
    received: int  # samples whose outputs arrived
    kept: deque[Entry] = field(default_factory=deque)  # answered since the recovery point
    checkpoint_at: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class Pending:
    seq: int
    entries: list[tuple[int, Entry]] | None  # (caller's sid, entry); None without reconnect
    future: asyncio.Future | None  # None: a replay message of the recovery


async def reopen(ws: ClientConnection, session: Session) -> tuple[dict, list]:
    """(opened, entries to replay) for one session on the new connection."""
    opened = await request(ws, {"type": "open", "ref": "resume",
                                      "resume": session.token, **session.options})
    if opened.get("type") == "opened" and opened["samples"] == session.received:
        return opened, []  # its state ends where our outputs do
    if opened.get("type") == "opened":  # outputs were lost in flight: start over
        await request(ws, {"type": "end", "sid": opened["sid"]})
    elif opened.get("code") != "resume_not_found":
        raise StreamError(opened.get("code", "bad_reply"), opened.get("message", ""))
    samples, state = session.base
    message = {"type": "open", "ref": "restart", **session.options}
    if state is not None:
        message["state"] = state
    opened = await request(ws, message)
    if opened.get("type") != "opened" or opened["samples"] != samples:
        raise StreamError("bad_state", f"the recovery point did not restore: {opened}")
    session.token = opened["resume_token"]
    replay = [e for e in session.kept if e.t >= samples]
    session.kept = deque(e for e in session.kept if e.t < samples)
    return opened, replay

async def request(ws: ClientConnection, message: dict) -> dict:
    """One control request on a connection nothing else reads yet (recovery)."""
    await ws.send(json.dumps(message))
    while True:
        reply = json.loads(await ws.recv())
        if reply.get("type") in ("opened", "error", "end"):
            return reply
