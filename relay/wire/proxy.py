"""The PROXY protocol, version 2: the client's address as a balancer passes it on.

Theory of operation
-------------------
Behind a TCP balancer (HAProxy in ``mode tcp``, as ``deploy/haproxy.cfg`` runs it) every
connection comes from the balancer's address, so the relay's per-address limits (connections,
distinct filter sets, resumes) would count every client as one. A balancer that sends the
PROXY protocol (HAProxy's ``send-proxy-v2``) puts a binary header before the client's first
byte: a 12-byte signature, a version and command byte, an address family byte, a 2-byte length,
then the addresses (and optional TLVs, which the relay skips). The specification:
https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt

The relay reads it only on connections from the addresses named in
``PGWS_PROXY_PROTOCOL_FROM``: anyone else could otherwise claim any address. From those, a
connection without a valid header is closed; elsewhere no header is expected.

Rules this module keeps: pure functions over bytes, no socket; version 2 only (version 1's
text form is not accepted); the ``LOCAL`` command (a balancer's own health check) and the
``UNSPEC`` family carry no client: the connection keeps its own address; the length is bounded
(:data:`MAX_LENGTH`), so a header costs a bounded read.
"""

from __future__ import annotations

import ipaddress
import struct

#: The first 12 bytes of every version 2 header.
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: The fixed part: signature, version and command, family, length.
HEAD_LENGTH = 16
#: The variable part's length at most: addresses (36 bytes for TCP over IPv6) and the TLVs a
#: balancer adds (HAProxy's unique id and TLS details stay well under 1 KiB).
MAX_LENGTH = 2048

_VERSION = 0x20
_LOCAL, _PROXY = 0x0, 0x1
_TCP4, _TCP6, _UNSPEC = 0x11, 0x21, 0x00


class ProxyError(ValueError):
    """The bytes are not a PROXY protocol version 2 header the relay accepts."""


def read_head(head: bytes) -> tuple[bool, int, int]:
    """The fixed 16 bytes → (whether it carries a client, its family byte, the length of the
    rest). Raises :class:`ProxyError`."""
    if len(head) != HEAD_LENGTH or not head.startswith(SIGNATURE):
        raise ProxyError("no PROXY protocol v2 signature")
    version_command, family, length = struct.unpack("!BBH", head[12:])
    if version_command & 0xF0 != _VERSION:
        raise ProxyError("not version 2")
    command = version_command & 0x0F
    if command not in (_LOCAL, _PROXY):
        raise ProxyError(f"unknown command {command}")
    if length > MAX_LENGTH:
        raise ProxyError(f"a header of {length} bytes")
    return command == _PROXY and family != _UNSPEC, family, length


def client(family: int, rest: bytes) -> tuple[str, int]:
    """The client's address and port from the variable part of a ``PROXY`` header of
    ``family``. Raises :class:`ProxyError` for a family other than TCP over IPv4 or IPv6, or
    too few bytes."""
    if family == _TCP4 and len(rest) >= 12:
        return str(ipaddress.IPv4Address(rest[:4])), int.from_bytes(rest[8:10], "big")
    if family == _TCP6 and len(rest) >= 36:
        return str(ipaddress.IPv6Address(rest[:16])), int.from_bytes(rest[32:34], "big")
    raise ProxyError(f"address family {family:#x} with {len(rest)} bytes")


def header(address: str, port: int, destination: str = "127.0.0.1",
           destination_port: int = 3000) -> bytes:
    """A ``PROXY`` header for a TCP client at ``address``: what a balancer sends (tests and the
    benchmarks use it to play one)."""
    source, target = ipaddress.ip_address(address), ipaddress.ip_address(destination)
    family = _TCP4 if source.version == 4 else _TCP6
    if target.version != source.version:
        target = ipaddress.ip_address("::1" if source.version == 6 else "127.0.0.1")
    body = source.packed + target.packed + struct.pack("!HH", port, destination_port)
    return SIGNATURE + struct.pack("!BBH", _VERSION | _PROXY, family, len(body)) + body
