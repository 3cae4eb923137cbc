"""Keeping a KV listener to loopback when the worker is only reachable there.

ucxx 0.52's Python API cannot choose the address its listener binds (libucxx's C++
ListenerBuilder::host exists, the binding does not expose it), so the listener takes its port on
every interface. When every peer dials a loopback address (`pdmesh up` on one machine), two
things make the worker as closed as a loopback bind would:
- UCX's own data listeners and lanes use the loopback device only (UCX_NET_DEVICES; with
  CM_USE_ALL_DEVICES off, or wire-up looks for other devices and fails);
- a connection that arrived on any other address is refused before the handshake reads a byte:
  `ucp_ep_query` (UCX's C API, through ctypes) says which local address it reached.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
from functools import cache
from typing import Any

_UCP_EP_ATTR_FIELD_LOCAL_SOCKADDR = 1 << 1
_UCP_ENTITY_NAME_MAX = 32
_SOCKADDR_STORAGE = 128


class _EndpointAttributes(ctypes.Structure):
    """ucp_ep_attr_t (ucp/api/ucp.h, UCX 1.20); only the fields up to the sockaddrs are read."""

    _fields_ = [
        ("field_mask", ctypes.c_uint64),
        ("name", ctypes.c_char * _UCP_ENTITY_NAME_MAX),
        ("local_sockaddr", ctypes.c_ubyte * _SOCKADDR_STORAGE),
        ("remote_sockaddr", ctypes.c_ubyte * _SOCKADDR_STORAGE),
        ("transports", ctypes.c_ubyte * 24),  # ucp_transports_t: pointer, unsigned, size_t
        ("user_data", ctypes.c_void_p),
    ]


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine's loopback ("localhost", 127.0.0.0/8, ::1)."""
    if host.strip("[]") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False  # a host name: whatever it resolves to, peers elsewhere may use it
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def loopback_device() -> str:
    """The loopback interface's name ("lo" on Linux, "lo0" on macOS)."""
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in names if n.startswith("lo")), "lo")


def arrived_on_loopback(endpoint: Any) -> bool:
    """Whether an accepted ucxx Endpoint reached this process through a loopback address."""
    local = local_address(endpoint.ucp_endpoint)
    return local is not None and is_loopback(local)


def local_address(ucp_endpoint: int) -> str | None:
    """The local IP address of a UCP endpoint, or None when UCX cannot say."""
    attributes = _EndpointAttributes(field_mask=_UCP_EP_ATTR_FIELD_LOCAL_SOCKADDR)
    if _ucp_ep_query()(ctypes.c_void_p(ucp_endpoint), ctypes.byref(attributes)) != 0:
        return None
    raw = bytes(attributes.local_sockaddr)
    family = int.from_bytes(raw[:2], "little")  # sa_family_t, host order (x86-64 and aarch64)
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8])
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24])
    return None


@cache
def _ucp_ep_query() -> Any:
    # libucp is already loaded by ucxx; dlopen by soname finds that copy.
    query = ctypes.CDLL("libucp.so.0").ucp_ep_query
    query.argtypes = [ctypes.c_void_p, ctypes.POINTER(_EndpointAttributes)]
    query.restype = ctypes.c_int
    return query
