"""Refuse to start a mesh on ports that are taken, before any process starts.

Without this check a mesh started on a taken port looks up while it is not: the readiness check
talks to whoever owns the scheduler's port, the scheduler dies on bind, and a worker whose UCX
port is taken dies with UCXXBusyError('Device is busy'). Each port is test-bound the way its
server will bind it (SO_REUSEADDR, as gRPC and UCX set it, so a port merely in TIME_WAIT passes);
a port another process listens on fails the bind on Linux even with SO_REUSEADDR.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterable
from dataclasses import dataclass

WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})


@dataclass(frozen=True)
class PortClaim:
    """A port one process of the mesh will listen on."""

    port: int
    host: str  # the address it binds; a wildcard binds every interface
    owner: str  # "the scheduler's gRPC port", "decode-0's KV (UCX) port"


class PortInUse(RuntimeError):
    def __init__(self, taken: list[PortClaim], fix: str) -> None:
        self.taken = taken
        lines = [f"port {c.port} ({c.owner}, on {c.host or '*'}) is already in use" for c in taken]
        super().__init__("; ".join(lines) + f". {fix}")


def check_free(claims: Iterable[PortClaim], fix: str) -> None:
    """Raise PortInUse naming every claimed port that cannot be bound now."""
    taken = [c for c in claims if not _bindable(c.host, c.port)]
    if taken:
        raise PortInUse(taken, fix)


def _bindable(host: str, port: int) -> bool:
    hosts = ["0.0.0.0", "::"] if host in WILDCARD_HOSTS else [host.strip("[]")]
    for h in hosts:
        try:
            infos = socket.getaddrinfo(h, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror:
            continue  # no such family here (an IPv4-only host asked about ::)
        for family, kind, proto, _, address in infos:
            if not _try_bind(family, kind, proto, address):
                return False
    return True


def _try_bind(family: int, kind: int, proto: int, address: tuple) -> bool:  # type: ignore[type-arg]
    try:
        sock = socket.socket(family, kind, proto)
    except OSError:
        return True  # the family is not available: nothing can listen there either
    with contextlib.closing(sock):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # as gRPC binds [::]
        try:
            sock.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
            if e.errno == errno.EADDRNOTAVAIL:
                return True  # not an address of this machine: the server's own bind will say so
            raise
    return True
