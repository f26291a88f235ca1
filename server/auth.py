"""API keys (Bearer header, or `?token=` for browser WebSockets) and the Origin allowlist."""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence


class Guard:
    def __init__(self, api_keys: Sequence[str], allowed_origins: Sequence[str]) -> None:
        self._keys = [k.encode() for k in api_keys]
        self._origins = {o.rstrip("/") for o in allowed_origins}

    @property
    def keys_required(self) -> bool:
        return bool(self._keys)

    def key_ok(self, headers: Mapping[str, str], query: Mapping[str, str] | None = None) -> bool:
        """True when no keys are configured or the request presents one of them."""
        if not self._keys:
            return True
        presented = _bearer(headers.get("authorization", ""))
        if presented is None and query is not None:
            presented = query.get("token")
        if not presented:
            return False
        candidate = presented.encode()
        # Compare against every key so the time taken does not reveal which one nearly matched.
        matches = [hmac.compare_digest(candidate, key) for key in self._keys]
        return any(matches)

    def origin_ok(self, headers: Mapping[str, str]) -> bool:
        """Browsers always send Origin; clients that send none are not browsers and pass."""
        if not self._origins:
            return True
        origin = headers.get("origin")
        return origin is None or origin.rstrip("/") in self._origins


def _bearer(value: str) -> str | None:
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
