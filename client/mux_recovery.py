"""A mux session's client-side bookkeeping and its recovery on a new connection: the recovery
point, the entries answered since, how a session is reopened after a drop; and the reading
of an outputs message."""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection

from client import wire
from client.connection import can_replay_from
from client.errors import StreamError
from client.wire import STATUS_CODES


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


async def reopen(ws: ClientConnection, session: Session) -> tuple[dict, int]:
    """(opened, the sample its replay starts from) for one session on the new connection.
    The caller replays the kept entries from there once every session is open."""
    opened = await request(ws, {"type": "open", "ref": "resume",
                                      "resume": session.token, **session.options})
    if opened.get("type") == "opened" and can_replay_from(
            opened["samples"], session.base[0], session.received, session.kept):
        return opened, opened["samples"]
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
    return opened, samples


async def request(ws: ClientConnection, message: dict) -> dict:
    """One control request on a connection nothing else reads yet (recovery)."""
    await ws.send(json.dumps(message))
    while True:
        reply = json.loads(await ws.recv())
        if reply.get("type") in ("opened", "error", "end"):
            return reply


def decode_outputs(data: bytes, d_output: int) -> tuple[int, list[tuple[int, Any]]]:
    """(seq, [(session, outputs array or StreamError), ...]) from an outputs message."""
    try:
        seq, entries = wire.decode_outputs(data, d_output)
    except (ValueError, struct.error) as exc:
        raise StreamError("bad_reply", str(exc)) from None
    return seq, [(sid, values if status == 0 else StreamError(
        STATUS_CODES.get(status, f"status_{status}"), "entry rejected; its session is unchanged"))
        for sid, status, values in entries]
