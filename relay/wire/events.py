"""Server-Sent Events: the ``text/event-stream`` bytes of the hub's messages.

Theory of operation
-------------------
An event stream (https://html.spec.whatwg.org/multipage/server-sent-events.html) is UTF-8 text
made of fields, one per line, an empty line ending each event. :class:`EventStream` is the
hub's :class:`relay.core.encoding.Encoding` for it (:data:`EVENT_STREAM`):

- a delivery is ``id: POSITION`` (when the stream has positions) and its payload as ``data:``
  lines: a browser's ``EventSource`` gives the joined ``data`` lines as the message, and keeps
  the ``id`` to send back as ``Last-Event-ID`` when it reconnects by itself;
- ``position``, ``resumed`` and ``lost`` are named events (``event: NAME``) with the position
  as their ``id`` too, so a quiet stream's reconnect resumes from where the stream is, not from
  its last delivery;
- a keep-alive is a comment line (``: N``), which clients ignore and proxies see as traffic.

A payload's line breaks (``\\r\\n``, ``\\r``, ``\\n``) split it into ``data:`` lines, which the
client joins with ``\\n``: a payload with ``\\r`` arrives with ``\\n`` there, the one change the
format forces. A payload without line breaks (JSON from ``json_build_object``, the usual case)
is sent as it is, in parts shared with the history.

Pure functions; no sockets.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from relay.wire import positions

_BREAKS = re.compile(rb"\r\n|\r|\n")


def _data(payload: bytes) -> bytes:
    """``data:`` lines for ``payload``, each ended by a line feed."""
    if b"\n" not in payload and b"\r" not in payload:
        return b"data: " + payload + b"\n"
    return b"".join(b"data: " + line + b"\n" for line in _BREAKS.split(payload))


class EventStream:
    """``text/event-stream``: the hub's encoding for the Server-Sent Events transport."""

    __slots__ = ()

    def message(self, text: bytes) -> bytes:
        """An event without an id (the stream has no positions: history is off)."""
        return _data(text) + b"\n"

    def event(self, name: str, position: str, text: bytes) -> bytes:
        return b"event: %s\nid: %s\n" % (name.encode(), position.encode()) + _data(text) + b"\n"

    def delivery(self, position: bytes, payload: bytes) -> Sequence[bytes]:
        """``id: POSITION``, then the payload as ``data:`` lines: five parts that share the
        position and the payload when it has no line break."""
        if b"\n" in payload or b"\r" in payload:
            return (b"id: ", position, b"\n", _data(payload), b"\n")
        return (b"id: ", position, b"\ndata: ", payload, b"\n\n")

    def delivery_text(self, position: bytes, payload: bytes) -> bytes:
        return positions.delivery(position, payload)

    def compressed(self, deflated: bytes) -> bytes:
        raise NotImplementedError("event streams are not compressed per message")

    def ping(self, counter: int) -> bytes:
        """A comment line: ignored by clients, traffic for the proxies on the way."""
        return b": %d\n\n" % counter


#: The one instance streams are keyed by.
EVENT_STREAM = EventStream()

#: What a client sends to ask for an event stream (the ``Accept`` header holds it).
MEDIA_TYPE = b"text/event-stream"
