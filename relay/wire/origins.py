"""Origins as the relay compares them: the ``Origin`` header and ``PGWS_ALLOWED_ORIGINS``.

An origin is compared as an origin, not as text (RFC 6454): scheme and host in any case, a
default port written or not. :func:`origin_key` gives both sides one comparable form, so the
configuration (which checks the setting at start-up) and the WebSocket handshake (which checks
the header) agree. Pure; no I/O.
"""

from __future__ import annotations

import re

#: An origin's serialization (RFC 6454 section 6.2): scheme "://" host [":" port], nothing
#: else (no path, no user information, no list): anything more is not an origin.
_ORIGIN = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(\[[0-9A-Fa-f:.]+\]|[^/?#@\[\]:\s,]+)(?::(\d{1,5}))?")

#: Ports that an origin's serialization leaves out, by scheme.
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def origin_key(value: str) -> str | None:
    """``value`` as a comparable origin (lower-case scheme and host, no default port), or
    None when it is not an origin's serialization. ``null`` (an opaque origin) stays ``null``.
    """
    if value == "null":
        return value
    match = _ORIGIN.fullmatch(value)
    if match is None:
        return None
    scheme, host, port = match.group(1).lower(), match.group(2).lower(), match.group(3)
    if port is not None:
        number = int(port)
        if number > 65535:
            return None
        if number != _DEFAULT_PORTS.get(scheme):
            return f"{scheme}://{host}:{number}"
    return f"{scheme}://{host}"
