"""The s4serve client: HTTP predict and model listing, and streaming sessions that survive a
dropped connection (reconnect, resume, replay: the caller sees every output exactly once).

    import numpy as np
    from client import Client

    with Client("http://127.0.0.1:8000") as c:
        print([m["name"] for m in c.models()])
        y = c.predict("motion", np.zeros((1, 50, 6), np.float32)).outputs   # (1, 50, 4)
        with c.stream("motion") as s:
            for row in np.zeros((20, 6), np.float32):
                logits = s.send(row[None])                                  # (1, 4)

`AsyncClient` has the same methods as coroutines. Dependencies: websockets, httpx, numpy.
"""

from client.api import AsyncClient, Client, Mux, PredictResult, Stream
from client.errors import ClientError, StreamError
from client.mux import AsyncMux
from client.stream import AsyncStream

__all__ = [
    "AsyncClient",
    "AsyncMux",
    "AsyncStream",
    "Client",
    "ClientError",
    "Mux",
    "PredictResult",
    "Stream",
    "StreamError",
]
