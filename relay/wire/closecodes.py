"""Close codes the relay sends, and the refusal of a client's message that carries one.

Shared by the transports (which send them) and the sources (which refuse a client's write with
one: too big, too fast, failed), so that neither imports the other. The numbers are RFC 6455's
(7.4.1) and upstream's 3001 for an expired token. No I/O.
"""

from __future__ import annotations

NORMAL = 1000
GOING_AWAY = 1001  # the relay is stopping: reconnect (elsewhere)
POLICY_VIOLATION = 1008  # over a budget (frames, bytes, writes)
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011  # a write the database refused: retry
TRY_AGAIN_LATER = 1013  # a slow consumer
JWT_EXPIRED = 3001  # the token's exp passed (upstream's code and text)


class MessageRefused(Exception):
    """A client's message is refused; the connection closes with ``code`` and ``reason``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
