"""Replies coalesced per connection while a tick runs: one socket write each at its end.

A tick answers every ready session, often several frames of one session in its rounds;
written one by one, each reply is a `send` system call (py-spy, 1000 per-sample sessions:
a fifth of a worker's time on that line). Held and joined, a connection costs one call per
tick however many replies it got. Nothing waits longer than the tick that produced it."""

from __future__ import annotations

from typing import Protocol


class Holder(Protocol):
    def release(self) -> None:
        """Write what was held."""


class Cork:
    """`with CORK:` around a tick; transports ask `active` before they write, and register
    once per tick with `hold`."""

    def __init__(self) -> None:
        self.active = False
        self._held: list[Holder] = []

    def hold(self, holder: Holder) -> None:
        self._held.append(holder)

    def __enter__(self) -> Cork:
        self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.active = False
        held, self._held = self._held, []
        for holder in held:
            holder.release()


CORK = Cork()  # one event loop per worker process, so one cork
