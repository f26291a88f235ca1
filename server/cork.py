"""Replies coalesced per connection while a round of a tick runs: one socket write each at its
end.

A round answers every ready session, often several frames of one session at once (a block,
server/sample_rounds.py); written one by one, each reply is a `send` system call
(py-spy, 1000 per-sample sessions: a fifth of a worker's time on that line). Held and joined,
a connection costs one call per round however many replies it got; they wait at most for the
rest of their round.

Reading is held too: a connection that may read again during a round (its queue drained)
resumes at its end. A message read mid-round could end, or take over, a session that the
round has stepped but not yet answered."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("s4serve.transport")


class Holder(Protocol):
    def release(self) -> None:
        """Write what was held."""


class Cork(threading.local):
    """`with CORK:` around a round; transports ask `active` before they write or resume
    reading, and register once per round with `hold` or `later`. Per thread: each thread runs
    its own event loop (tests run several servers in one process)."""

    def __init__(self) -> None:
        self.active = False
        self._held: list[Holder] = []
        self._later: list[Callable[[], None]] = []

    def hold(self, holder: Holder) -> None:
        self._held.append(holder)

    def later(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the round is over and its replies are written."""
        self._later.append(callback)

    def __enter__(self) -> Cork:
        self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.active = False
        held, self._held = self._held, []
        later, self._later = self._later, []
        for holder in held:
            try:
                holder.release()
            except Exception:  # one broken connection must not keep the others' replies
                log.exception("writing a round's replies failed")
        for callback in later:
            try:
                callback()
            except Exception:
                log.exception("resuming a connection after a round failed")


CORK = Cork()
