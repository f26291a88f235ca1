"""Errors the server answered, with the contract's code."""

from __future__ import annotations


class ClientError(Exception):
    """An HTTP error answer: `status`, `code` (e.g. "bad_shape") and the server's message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class StreamError(Exception):
    """A stream error: a rejected frame (`seq` set; the session goes on) or a closed session."""

    def __init__(self, code: str, message: str, seq: int | None = None,
                 close_code: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.seq = code, message, seq
        self.close_code = close_code  # the WebSocket close code, when code == "closed"
