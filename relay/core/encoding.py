"""The contract of an encoding: how a transport puts the hub's messages on its wire.

The hub decides who receives what; an encoding decides the bytes. Every stream of the hub has
one (a stream's clients speak the same transport), and the hub asks it for each message's bytes
once per batch, whatever the number of clients: so the fan-out is the same for every transport,
and a transport adds an encoding, never an edit of the hub. WebSocket text frames are
:class:`relay.wire.frames.TextFrames`; to add one, implement :class:`Encoding` beside the
transport's wire format in :mod:`relay.wire` and pass it to :meth:`relay.core.hub.Hub.add`.

What the hub promises an encoding, and what it needs back:

- Messages are given as their text: a notification's payload (UTF-8, unchanged, to
  :meth:`Encoding.message` or :meth:`Encoding.delivery`), or a control event of the resume
  protocol (:meth:`Encoding.event`: its name, position and JSON text).
- Every method is pure and cheap: it is called on the fan-out path, at most once per message
  and batch (replays: once per replayed entry and client). It must not raise for any text.
- What it returns is shared: the same bytes object goes to every client of every stream with
  this encoding, so it must not depend on the client.
- Instances are compared by identity and hashed (a stream's key holds its encoding): make one
  instance per encoding, at module level.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Encoding(Protocol):
    """The bytes of the hub's messages on one transport's wire."""

    def message(self, text: bytes) -> bytes:
        """One message carrying ``text`` (a payload, or a control event).

        Args: ``text``: UTF-8. Returns: the bytes a client receives for it. Raises: nothing.
        """

    def event(self, name: str, position: str, text: bytes) -> bytes:
        """One control event of the resume protocol (:mod:`relay.wire.positions`).

        Args: ``name``: ``position``, ``resumed`` or ``lost``; ``position``: the position it
        names (where the stream is; for ``resumed``, the one resumed from); ``text``: the event
        as the WebSocket protocol spells it (JSON). Returns: its bytes. Raises: nothing.
        """

    def delivery(self, position: bytes, payload: bytes) -> Sequence[bytes]:
        """One notification with its position, for a positioned client.

        Args: ``position``: the text a client resumes from (sealed, ASCII); ``payload``: the
        notification's. Returns: parts whose concatenation is the message; the parts are kept
        by a replay as long as its client needs them, so they should share ``position`` and
        ``payload`` (the history's own objects) rather than copy them. Raises: nothing.
        """

    def delivery_text(self, position: bytes, payload: bytes) -> bytes:
        """What :meth:`delivery` carries, before the encoding's framing: the text a
        compressor compresses (:meth:`compressed`)."""

    def compressed(self, deflated: bytes) -> bytes:
        """One message whose text was compressed (permessage-deflate's ``deflated``).

        Called only for clients the transport added with a compression other than OFF; an
        encoding whose transport never agrees to compression may raise NotImplementedError.
        """

    def ping(self, counter: int) -> bytes:
        """The keep-alive the hub offers every client now and then (``counter``: 1, 2, …)."""
