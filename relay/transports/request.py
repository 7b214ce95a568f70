"""Where a WebSocket request puts its channel and its token.

Theory of operation
-------------------
postgres-websockets takes the raw request target, drops the leading ``/`` and splits the rest
on ``/``: one element is the token (``/TOKEN``); two or more are channel and token
(``/CHANNEL/TOKEN``, extra elements ignored). Nothing is percent-decoded.

The ``Origin`` header is compared as an origin, not as text
(:func:`relay.wire.origins.origin_key`): RFC 6454 makes scheme and host case-insensitive and a
default port the same as none.

This module keeps those rules and adds two ways to pass the token that upstream lacks
(https://github.com/diogob/postgres-websockets/issues/84): a ``jwt`` query parameter and an
``Authorization: Bearer`` header. The query string is stripped before the path is split, so
``/TOKEN?x=1`` works too. When the token comes from the query or the header, the path's first
element, if any, is the channel (``/chat?jwt=T``).

A browser's ``WebSocket`` and ``EventSource`` cannot send a header, and a token in the URL
ends up in logs: the token may also come in a cookie (``cookie``: its name, given only when
cookie authentication is on; :mod:`relay.transports.admission` decides when a cookie may be
trusted). The query and the header win over the cookie.

Every ``filter`` query parameter is collected, percent-decoded and in order, for
:mod:`relay.core.filters` to parse (an empty one too: it is a mistake to report, not to skip). Other
query parameters are ignored, as upstream ignores them.

Pure functions only: no validation of the token (that is :mod:`relay.auth.tokens`), no sockets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from urllib.parse import parse_qsl

from relay.wire.positions import FROM_PARAMETER


@dataclasses.dataclass(frozen=True)
class Target:
    """The requested channel (``None`` when the URL names none), the token text, and the
    ``filter`` parameters' texts."""

    channel: str | None
    token: str
    filters: tuple[str, ...] = ()
    #: The ``from`` parameter: the position to resume after (:mod:`relay.wire.positions`).
    position: str | None = None
    #: The token came from the cookie (a browser sends it whatever page opens the socket).
    from_cookie: bool = False


def header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (given in lower case), or ``None``."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _bearer(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    value = header(headers, b"authorization")
    if value is None:
        return None
    scheme, _, credentials = value.decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


def cookie(headers: Iterable[tuple[bytes, bytes]], name: str) -> str | None:
    """The value of cookie ``name`` in the request's ``Cookie`` headers (the first), or None."""
    wanted = name.encode()
    for key, value in headers:
        if key.lower() != b"cookie":
            continue
        for pair in value.split(b";"):
            found, sep, text = pair.strip().partition(b"=")
            if sep and found == wanted and text:
                return text.strip().strip(b'"').decode("latin-1")
    return None


def parse_target(target: bytes, headers: Iterable[tuple[bytes, bytes]] = (),
                 cookie_name: str | None = None) -> Target:
    """Split a raw request target (path and query, as sent) into channel and token."""
    text = target.decode("utf-8", "replace")
    path, _, query = text.partition("?")
    elements = path[1:].split("/") if path.startswith("/") else path.split("/")

    parameters = parse_qsl(query, keep_blank_values=True)
    filters = tuple(value for key, value in parameters if key == "filter")
    position = next((value for key, value in parameters if key == FROM_PARAMETER), None)
    outside = next((value for key, value in parameters if key == "jwt" and value), None)
    if outside is None:
        outside = _bearer(headers)
    if outside is not None:
        return Target(elements[0] or None, outside, filters, position)
    if cookie_name is not None and len(elements) == 1 and \
            (baked := cookie(headers, cookie_name)) is not None:
        # Only when the path holds no token: /CHANNEL with the token in the cookie.
        return Target(elements[0] or None, baked, filters, position, from_cookie=True)

    if len(elements) == 1:
        return Target(None, elements[0], filters, position)
    return Target(elements[0], elements[1], filters, position)


def subprotocols(headers: Iterable[tuple[bytes, bytes]]) -> list[str]:
    """The subprotocols a WebSocket request offers, in order (every Sec-WebSocket-Protocol
    header, split on commas, as wsproto splits them)."""
    return [piece.strip() for key, value in headers if key.lower() == b"sec-websocket-protocol"
            for piece in value.decode("latin-1").split(",") if piece.strip()]


