"""Logging setup: plain or JSON lines, with the request or session id when there is one."""

from __future__ import annotations

import contextvars
import json
import logging
import time

# Set by handlers so every log line inside a request or session carries its id.
context_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("context_id", default=None)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.context_id = context_id.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "id": getattr(record, "context_id", None),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(level: str = "info", json_lines: bool = False) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(_ContextFilter())
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(context_id)s] %(message)s")
        )
    root = logging.getLogger("s4serve")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
