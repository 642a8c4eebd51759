"""Binding the listening socket and naming it: light (no torch), so a busy port fails at once."""

from __future__ import annotations

import ipaddress
import socket

from headvis.errors import HeadvisError

__all__ = ["LOOPBACK_NAMES", "allowed_hosts_for", "bind", "is_loopback", "url_for"]

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one); HeadvisError when it cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise HeadvisError(f"--host {host}: cannot resolve it ({e.strerror})") from e
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise HeadvisError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.setblocking(False)
    return sock


def url_for(sock: socket.socket) -> str:
    """The URL a browser on this machine uses for `sock` (a wildcard bind is advertised as loopback)."""
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def allowed_hosts_for(host: str, url: str) -> tuple[str, ...] | None:
    """Host-header names to accept: the loopback names for a loopback bind, anything otherwise."""
    if not is_loopback(host):
        return None
    own = url.split("//", 1)[1].rsplit(":", 1)[0].strip("[]")
    return tuple(dict.fromkeys((*LOOPBACK_NAMES, host, own)))
