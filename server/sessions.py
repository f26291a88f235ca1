"""Streaming sessions: creation, state blobs, resume tokens, takeover and detachment.

A session lives while a connection owns it. When the connection drops without `end`, the
session's state goes to the `SessionStore` for `resume_ttl` seconds under its resume token;
a connection presenting the token brings it back. A token presented while another connection
still owns the session takes the session over and the older connection is closed.
"""

from __future__ import annotations

import base64
import logging
import secrets
import time
import uuid
from concurrent.futures import Future, wait
from dataclasses import dataclass, field, replace
from typing import Protocol

from server.backends.base import refuse_unstreamable
from server.errors import ServeError
from server.metrics import Metrics
from server.models import LoadedModel
from server.protocol import StartOptions
from server.replies import ReplyRing
from server.scheduler import Scheduler, Sink, Stream
from server.state_blob import StateRecord, decode_state, decode_state_raw, encode_state_raw
from server.store import SessionRecord, SessionStore, token_hash

log = logging.getLogger("s4serve.sessions")


class Owner(Sink, Protocol):
    """The connection serving a session: it gets the session's replies."""

    def kick(self, code: int, reason: str) -> None: ...


@dataclass(eq=False)
class Session:
    id: str
    token: str
    model: LoadedModel
    dtype: str
    sample_rate: float | None
    output: str
    stream: Stream
    owner: Owner | None = None
    epoch: int = 0  # the store's epoch this process holds the session at
    checkpointed: int = -1  # samples at its last checkpoint (-1: none yet)
    stored: bool = False  # a checkpoint of it is in the store
    written_at: float = 0.0  # time.monotonic() of that checkpoint
    lost: bool = False  # taken over by another process: nothing more goes to the store
    ring: ReplyRing = field(default_factory=lambda: ReplyRing(0))  # replies sent, the last kept

    @property
    def name(self) -> str:
        return self.model.info.name

    def started_message(self, samples: int) -> dict:
        info = self.model.info
        return {
            "type": "started",
            "session": self.id,
            "resume_token": self.token,
            "model": info.name,
            "version": info.version,
            "d_input": info.d_input,
            "d_output": info.d_output,
            "dtype": self.dtype,
            "sample_rate": self.sample_rate,
            "labels": info.labels,
            "output": self.output,
            "samples": samples,
        }


class SessionManager:
    """Every method runs on the event loop, where the scheduler's ticks run too, so a
    session's state can be read or replaced between ticks without locks."""

    def __init__(
        self, scheduler: Scheduler, store: SessionStore, metrics: Metrics, resume_ttl: float,
        secret: str | None = None, ring_bytes: int = 32768,
    ) -> None:
        self.scheduler = scheduler
        self.store = store
        self.metrics = metrics
        self.resume_ttl = resume_ttl
        self.secret = secret  # signs the state blobs it issues, checks the ones it gets
        self.ring_bytes = ring_bytes
        self.live: dict[str, Session] = {}
        self._writing: Future | None = None  # a checkpoint write in the writer thread

    def writing(self, future: Future) -> None:
        """A checkpoint write handed to the writer thread: the store operations below wait
        for it, so that the store sees one order per session (a detach after a checkpoint is
        the record that stays; an ended session's record is not written back after forget)."""
        self._writing = future

    def _settle(self) -> None:
        if self._writing is not None:
            wait([self._writing])  # its failure is the checkpointer's to report
            self._writing = None

    def open(self, model: LoadedModel, opts: StartOptions, owner: Owner) -> Session:
        """A new session, from zeros or from a state blob."""
        backend = model.backend
        refuse_unstreamable(model.info)
        sample_rate = opts.sample_rate if opts.sample_rate is not None else model.info.sample_rate
        rate = backend.rate_for(opts.sample_rate)
        arrays, samples = None, 0
        if opts.state is not None:
            record = decode_state(opts.state, self.secret)
            record.check(model.info.name, model.info.version, backend.state_spec)
            arrays, samples = record.tensors, record.samples
        session = self._place(
            model, uuid.uuid4().hex, secrets.token_urlsafe(24), opts.dtype, sample_rate,
            opts.output, rate, arrays, samples, owner,
        )
        if arrays is None:
            session.checkpointed = 0  # nothing to keep until it advances
        return session

    def maybe_elsewhere(self, token: str, handoff: object | None) -> bool:
        """Ask the other workers first: a session live on one of them has a checkpoint in the
        store that may be behind its live state, which its owner hands over when asked."""
        return handoff is not None and token not in self.live

    def resume(self, model: LoadedModel, token: str, owner: Owner) -> tuple[Session, int]:
        """Take over a live session or bring back a stored one; returns it and its samples."""
        refuse_unstreamable(model.info)
        session = self.live.get(token)
        if session is not None:
            if session.model is not model:
                raise ServeError("bad_request", "this resume token belongs to another model")
            previous, session.owner = session.owner, owner
            # The old connection's queued frames would be answered to a dead socket: drop them;
            # `samples` tells the client where to replay from.
            self.scheduler.drop(session.stream)
            session.stream.sink = owner
            if previous is not None and previous is not owner:
                previous.kick(1008, "resumed_elsewhere")
            self.metrics.sessions_opened.labels(session.name).inc()
            log.info("session %s taken over by a new connection", session.id)
            return session, session.stream.samples
        self._settle()
        record = self.store.take(token)
        if record is None:
            raise ServeError("resume_not_found", "unknown or expired resume token")
        try:
            if record.model != model.info.name:
                raise ServeError("bad_request", "this resume token belongs to another model")
            state = decode_state_raw(record.state, self.secret)
            state.check(model.info.name, model.info.version, model.backend.state_spec)
            session = self._place(
                model, record.session_id, token, record.dtype, record.sample_rate,
                record.output,
                model.backend.rate_for(record.sample_rate if model.info.sample_rate else None),
                state.tensors, state.samples, owner,
            )
        except ServeError:
            # taken but not resumed (no free slot, say): back in the store under the epoch
            # the take moved it to, so the client's retry finds it
            self.store.put(token, record, self.resume_ttl, record.epoch)
            raise
        session.epoch = record.epoch  # the take made this process its owner
        session.ring = ReplyRing(self.ring_bytes, record.replies, ReplyRing.unpack(record.ring))
        # back in the store at once, under its new epoch: the take left no record of it, and
        # a SIGKILL before the first checkpoint would otherwise lose the whole session
        if not self.store.put(token, replace(record, live=True), self.resume_ttl,
                              record.epoch):
            self._release(session)  # taken again meanwhile, by another process
            raise ServeError("resume_not_found", "this session was resumed elsewhere",
                             final=True)
        session.checkpointed, session.stored = state.samples, True
        session.written_at = time.monotonic()
        log.info("session %s resumed at sample %d", session.id, state.samples)
        return session, state.samples

    def _place(self, model, session_id, token, dtype, sample_rate, output, rate, arrays,
               samples, owner) -> Session:
        stream = self.scheduler.open(model.pool, rate, output == "last", arrays, samples)
        if stream is None:
            raise ServeError("overloaded", "no free session slot for this model")
        stream.sink = owner
        session = Session(session_id, token, model, dtype, sample_rate, output, stream, owner,
                          ring=ReplyRing(self.ring_bytes))
        self.live[token] = session
        self.metrics.sessions_active.labels(session.name).inc()
        self.metrics.sessions_opened.labels(session.name).inc()
        return session

    def blob(self, session: Session, samples: int, arrays) -> str:
        """A session's state at `samples`, as clients carry it (base64 text)."""
        return base64.b64encode(self.raw_blob(session, samples, arrays)).decode("ascii")

    def raw_blob(self, session: Session, samples: int, arrays) -> bytes:
        info = session.model.info
        names = [spec.name for spec in session.model.backend.state_spec]
        return encode_state_raw(
            StateRecord(info.name, info.version, samples, list(arrays), names,
                        session.sample_rate),
            self.secret,
        )

    def record(self, session: Session, samples: int, arrays=None, live: bool = False,
               blob: bytes | tuple | None = None) -> SessionRecord:
        """What the store keeps of a session: its options and its state at `samples` (the
        tensors `arrays`, or a blob already made)."""
        return SessionRecord(
            session.id, session.name, session.dtype, session.sample_rate, session.output,
            samples, blob if blob is not None else self.raw_blob(session, samples, arrays),
            live=live, replies=session.ring.count, ring=session.ring.pack(),
        )

    def end(self, session: Session) -> int:
        """Finish a session for good (its state is discarded); returns its sample count."""
        samples, _ = self._release(session)
        if session.stored:
            self._settle()
            self.store.forget(session.token, session.epoch)
        return samples

    def detach(self, session: Session, owner: Owner) -> None:
        """The owner's connection is gone: its queued work is dropped and the state stays
        resumable for resume_ttl seconds."""
        if session.owner is not owner:  # taken over: the session lives on elsewhere
            return
        samples, arrays = self._release(session)
        if session.lost:
            return
        record = self.record(session, samples, arrays)
        self._settle()
        if self.store.put(session.token, record, self.resume_ttl, session.epoch):
            log.info("session %s detached at sample %d, resumable", session.id, samples)
        else:
            log.warning("session %s detached but taken over elsewhere: state not kept",
                        session.id)

    def fenced(self, session: Session) -> None:
        """The store says another process took this session over: close our connection and
        forget it here, writing nothing more."""
        session.lost = True
        if session.owner is not None:
            session.owner.kick(1008, "resumed_elsewhere")
        else:
            self._release(session)

    def _release(self, session: Session) -> tuple[int, list]:
        session.owner = None
        if self.live.get(session.token) is session:
            del self.live[session.token]
            self.metrics.sessions_active.labels(session.name).dec()
        return self.scheduler.release(session.stream)

    def let_go(self, token: str) -> bool:
        """Another worker was asked to resume this live session: close our connection and
        detach the session into the shared store now. True when it was live here."""
        session = self.live.get(token)
        if session is None:
            return False
        if session.owner is not None:
            session.owner.kick(1008, "resumed_elsewhere")  # detaches it
        else:
            self.detach(session, None)
        return True

    def let_go_hashed(self, digest: str) -> bool:
        """`let_go` for the live session whose token hashes to `digest` (another replica
        asks by hash: tokens never travel between replicas)."""
        for token in list(self.live):
            if token_hash(token) == digest:
                return self.let_go(token)
        return False
