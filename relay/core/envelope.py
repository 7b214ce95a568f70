"""The JSON envelopes: routing a NOTIFY payload, and the text of client writes and meta events.

Theory of operation
-------------------
Database → clients: a payload is routed by its top-level string ``channel`` member, else to the
listen channel's own name (upstream's routing); the payload itself is never rewritten.

Clients → database: a message from a ``w``/``rw`` client becomes, per allowed channel,
``{"channel", "claims" (+ "message_delivered_at"), "event": "WebsocketMessage", "payload"}``,
compact with keys sorted at every level and non-ASCII kept as UTF-8, like upstream's aeson
output. Meta events (``ConnectionOpen``/``ConnectionClose``) have the same shape, as upstream's;
so has ``ListenerReconnected``, whose claims hold only the time and whose payload is an object,
``{"since": t0, "until": t1}``: the window in which notifications were lost.

Pure functions; no database calls.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

WEBSOCKET_MESSAGE = "WebsocketMessage"
CONNECTION_OPEN = "ConnectionOpen"
CONNECTION_CLOSE = "ConnectionClose"
LISTENER_RECONNECTED = "ListenerReconnected"


class _NotJson:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NOT_JSON"


#: What :func:`parse` gives for a payload that is not JSON (``None`` is JSON's ``null``).
NOT_JSON: Any = _NotJson()


def parse(payload: bytes) -> Any:
    """The payload's JSON document (orjson: integers beyond 64 bits become floats), or
    :data:`NOT_JSON`. Parsed once per notification: routing and filters share it."""
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return NOT_JSON


def channel_of(document: Any, listen_channel: str) -> str:
    """The WebSocket channel of a parsed payload: its top-level string ``channel``, else the
    listen channel's own name."""
    if isinstance(document, dict):
        channel = document.get("channel")
        if isinstance(channel, str):
            return channel
    return listen_channel


def route(payload: bytes, listen_channel: str) -> str:
    """The WebSocket channel a NOTIFY payload goes to."""
    return channel_of(parse(payload), listen_channel)


def _dumps(document: dict[str, Any]) -> bytes:
    """Compact, sorted UTF-8 JSON; never raises for anything a token's JSON could hold.

    Claims may hold what orjson refuses: integers beyond 64 bits, which the standard library
    writes exactly with the same output; and lone surrogates (``"\\ud800"``, what
    ``JSON.stringify`` and ``json.dumps`` write for a user-chosen name cut in half), which no
    UTF-8 text can carry and which orjson and PostgreSQL's ``json`` refuse to read back, so a
    listener could not route or parse the envelope: each becomes U+FFFD, as UTF-8 decoders
    replace what they cannot decode.
    """
    try:
        return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode()


def build(channel: str, claims: dict[str, Any], event: str, payload: Any, now: float) -> bytes:
    """One envelope as UTF-8 JSON bytes; ``now`` is Unix time in seconds."""
    return _dumps({
        "channel": channel,
        "claims": {**claims, "message_delivered_at": now},
        "event": event,
        "payload": payload,
    })


def listener_reconnected(channel: str, since: float, until: float) -> bytes:
    """The meta event for a window without LISTEN, from ``since`` to ``until`` (Unix time)."""
    return build(channel, {}, LISTENER_RECONNECTED, {"since": since, "until": until}, until)
