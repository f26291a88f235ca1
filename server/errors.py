"""The documented error codes, and the one exception type that carries them."""

from __future__ import annotations

from typing import Any

# code -> HTTP status for the HTTP API; WebSocket errors reuse the codes in text messages.
HTTP_STATUS: dict[str, int] = {
    "bad_request": 400,
    "bad_shape": 400,
    "bad_dtype": 400,
    "non_finite": 400,
    "bad_state": 400,
    "not_streamable": 400,
    "unauthorized": 401,
    "model_not_found": 404,
    "body_timeout": 408,
    "too_large": 413,
    "unsupported_media_type": 415,
    "invalid_request": 422,
    "internal": 500,
    "overloaded": 503,
    "not_ready": 503,
    "timeout": 504,
}

# WebSocket close codes (RFC 6455 + the contract).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013


class ServeError(Exception):
    """An error with a documented code; the message is shown to the client."""

    def __init__(self, code: str, message: str, *, final: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.final = final  # not worth a retry (a resume_not_found that is not "not yet")

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 400)

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}

    def ws_message(self) -> dict[str, Any]:
        return {"type": "error", "code": self.code, "message": self.message}
