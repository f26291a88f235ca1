"""Where a load test may point: loopback only unless the operator says otherwise."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


class RemoteTargetError(ValueError):
    """The target resolves to a non-loopback address and --allow-remote was not given."""


def check_target(url: str, allow_remote: bool = False) -> None:
    """Refuse targets that resolve to anything but loopback, so tests never load a real host."""
    host = urlsplit(url).hostname
    if not host:
        raise ValueError(f"no host in URL {url!r}")
    if allow_remote:
        return
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {host!r}: {exc}") from exc
    addresses = {info[4][0] for info in infos}
    remote = sorted(a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if remote:
        raise RemoteTargetError(
            f"{host} resolves to non-loopback {', '.join(remote)}; pass --allow-remote to load it"
        )
