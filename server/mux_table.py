"""A mux connection's sessions by id, and the routes of its fast path."""

from __future__ import annotations

from typing import Any

import numpy as np

# routes kept per connection (a gateway that sends ever other subsets of its sessions)
MAX_ROUTES = 64


class HandleTable:
    """The handles of one connection's sessions by id. A route, the streams of a data
    message's list of ids and their rate, is worked out once per list and kept while the
    table is unchanged: a gateway sends the same list every tick."""

    def __init__(self) -> None:
        self._by_sid: dict[int, Any] = {}
        self._routes: dict[bytes, tuple[list, float]] = {}

    def __len__(self) -> int:
        return len(self._by_sid)

    def get(self, sid: Any) -> Any:
        return self._by_sid.get(sid)

    def values(self) -> list:
        return list(self._by_sid.values())

    def add(self, handle: Any) -> None:
        self._by_sid[handle.sid] = handle
        self._routes.clear()

    def pop(self, sid: int) -> Any:
        handle = self._by_sid.pop(sid, None)
        self._routes.clear()
        return handle

    def clear(self) -> None:
        self._by_sid.clear()
        self._routes.clear()

    def route(self, sids: np.ndarray) -> tuple[list, float] | None:
        """The streams of `sids` and their rate, when they are distinct float32 sessions of
        one rate; else None."""
        key = sids.tobytes()
        route = self._routes.get(key)
        if route is None:
            route = self._work_out(sids.tolist())
            if route is None:
                return None
            if len(self._routes) >= MAX_ROUTES:
                self._routes.clear()
            self._routes[key] = route
        return route

    def _work_out(self, sids: list[int]) -> tuple[list, float] | None:
        streams, rate = [], None
        for sid in sids:
            handle = self._by_sid.get(sid)
            session = handle.session if handle is not None else None
            if session is None or session.dtype != "float32":
                return None
            stream = session.stream
            if rate is None:
                rate = stream.rate
            elif stream.rate != rate:
                return None
            streams.append(stream)
        return (streams, rate) if len(set(map(id, streams))) == len(streams) else None
