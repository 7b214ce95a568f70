"""Admission: a request's target and headers → the grant to serve it with, or the refusal.

Theory of operation
-------------------
Every transport admits a client the same way, in upstream's order, before it answers: the relay
is not stopping (503), the Origin is allowed (403), a connection slot is free (503), the token
grants the channel (400, upstream's texts), the filters parse (400) and fit the channel's
budget (503), a resume position can be taken (400) at this address's rate (429). What the
client then speaks (the WebSocket handshake) is the transport's own business.

Shared caps (connection slots, filter sets) are checked and held in the same synchronous call,
before the transport awaits anything, so handshakes that arrive together, or clients parked
while their resume waits, are all counted; :class:`Held` records what one connection holds,
and :meth:`Admission.release` gives it back when the connection ends, refused or not.

Pure bookkeeping over :mod:`relay.core` and :mod:`relay.auth`: no socket, no await, no clock
of its own (callers pass the time); every refusal is a :class:`Refusal` with its exact status,
text and the reason it is counted under (:data:`relay.core.stats.REFUSAL_REASONS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from relay.auth import tokens
from relay.config import Config
from relay.core import filters, limits
from relay.core.filters import Filters
from relay.core.history import History
from relay.core.limits import AddressRate, FilterBudget
from relay.transports import request
from relay.wire import origins, positions

#: HTTP 503 texts of :class:`relay.core.limits.FilterBudget`'s refusals.
_FILTER_REFUSALS = {limits.SETS: "Too many distinct filters",
                    limits.COST: "Too many distinct filters",
                    limits.ADDRESS: "Too many distinct filters from this address"}


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is not admitted: the HTTP status, its body, and the counted reason."""

    status: int
    text: str
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class Admitted:
    """What an admitted client is served with."""

    grant: tokens.Grant
    #: The URL's filters on top of the token's claim (the claim's own set when the URL has none).
    filters: Filters
    #: It offered the resume subprotocol and history is on; ``resume``: the position it comes
    #: back with (None: a fresh start).
    positioned: bool
    resume: positions.Position | None


class Held:
    """What one connection holds of the shared caps; give it back with
    :meth:`Admission.release`."""

    __slots__ = ("channels", "claimed", "filters", "slot")

    def __init__(self) -> None:
        self.slot = False
        self.channels: tuple[str, ...] = ()
        self.filters: Filters = filters.NONE
        self.claimed = False


def _resume_refusal(position: str, positioned: bool, history_on: bool) -> str | None:
    """Why a ``from`` parameter cannot be taken (the 400 body), or None."""
    if not history_on:
        return "Cannot resume: history is off (PGWS_HISTORY_MESSAGES=0)"
    if not positioned:
        return f"Resuming needs the {positions.SUBPROTOCOL} subprotocol"
    if positions.parse_position(position) is None:
        return "Invalid position"
    return None


class Admission:
    """The relay's admission, shared by its transports (one per process)."""

    def __init__(self, config: Config, keys: Sequence[tokens.Key],
                 history: History | None) -> None:
        self._config = config
        self._grants = tokens.GrantCache(keys)
        self._history = history
        self._budget = FilterBudget(config.max_filter_sets, config.max_filter_cost,
                                    config.max_filter_sets_per_ip)
        rate = config.max_resumes_per_second_per_ip
        self._resumes = AddressRate(rate, max(1.0, 2 * rate))
        #: Connections holding a slot of ``PGWS_MAX_CONNECTIONS``.
        self.slots = 0
        #: Set when the relay stops: every request is refused.
        self.shutting_down = False

    def admit(self, target: bytes, headers: Sequence[tuple[bytes, bytes]], network: str,
              held: Held, now: float, monotonic: float, events: bool = False
              ) -> Admitted | Refusal:
        """Admit a request for ``target`` with ``headers`` from ``network``; what it takes of
        the shared caps is recorded in ``held`` (also when it is refused after taking them).
        ``now``: Unix time (token times); ``monotonic``: the rate limits' clock. ``events``: an
        event stream, which has positions whenever history is on and resumes from the
        ``Last-Event-ID`` header (a browser's own reconnect sends it, with the first URL and
        its ``from``: the header is the newer) or ``from``."""
        config = self._config
        if self.shutting_down:
            return Refusal(503, "Shutting down", "shutting_down")
        origin = request.header(headers, b"origin")
        if config.allowed_origins and origin is not None and \
                origins.origin_key(origin.decode("latin-1")) not in config.allowed_origins:
            return Refusal(403, "Origin not allowed", "origin")
        if config.max_connections and self.slots >= config.max_connections:
            return Refusal(503, "Too many connections", "capacity")
        self.slots += 1
        held.slot = True
        # Cookie authentication is on only with allowed origins: any site's page can make a
        # browser send its cookies.
        parsed = request.parse_target(target, headers, config.token_cookie
                                      if config.allowed_origins else None)
        if parsed.from_cookie and origin is None and \
                request.header(headers, b"sec-fetch-site") != b"same-origin":
            # An allowed Origin was checked above; without one, only the browser's own word
            # (a header no page can set) that the page is this site's.
            return Refusal(403, "Origin required with a cookie token", "origin")
        try:
            grant = self._grants.check(parsed.token, parsed.channel, now)
        except tokens.AuthError as refused:
            return Refusal(400, str(refused), "token")
        try:
            # The URL's filters narrow what the token's claim allows; they never widen it.
            # Without any, the grant's own set is shared, not copied per connection.
            filter_set = (grant.filters | filters.parse_all(parsed.filters) if parsed.filters
                          else grant.filters)
        except filters.FilterError as bad:
            return Refusal(400, str(bad), "filter")
        if grant.can_read:
            # A set is the issuer's only as the issuer made it: one the URL added filters to is
            # the client's own making, counted with the URL sets (and per address).
            claimed = bool(grant.filters) and not parsed.filters
            full = self._budget.hold(grant.channels, filter_set, claimed, network)
            if full is not None:
                return Refusal(503, _FILTER_REFUSALS[full], "capacity")
            held.channels, held.filters, held.claimed = grant.channels, filter_set, claimed
        history = self._history
        positioned = history is not None and \
            (events or positions.SUBPROTOCOL in request.subprotocols(headers))
        resume = None
        asked = parsed.position
        if events:
            last_event = request.header(headers, b"last-event-id")
            if last_event:
                asked = last_event.decode("latin-1")
        if asked is not None:
            why = _resume_refusal(asked, positioned, history is not None)
            if why is not None:
                return Refusal(400, why, "position")
            if not self._resumes.take(network, monotonic):
                return Refusal(429, "Too many resumes from this address", "resumes")
            assert history is not None  # _resume_refusal said so.
            resume = history.open(asked)
        return Admitted(grant, filter_set, positioned, resume)

    def refresh(self, token: object, old: tokens.Grant, channel: str | None, now: float
                ) -> tokens.Grant | str:
        """A connection's new token (sent on the connection: ``{"event":"token"}``): the grant
        it gives, or why it is refused. It is checked as at connect (``channel``: the one the
        URL named), and must grant at least the connection's channels and mode, with exactly
        its filters claim: a different filter is another subscription, not a refresh."""
        if not isinstance(token, str) or not token:
            return "the token must be a string"
        try:
            grant = self._grants.check(token, channel, now)
        except tokens.AuthError as refused:
            return str(refused)
        if not set(old.mode) <= set(grant.mode):
            return f"mode {grant.mode!r} does not cover {old.mode!r}"
        if not set(old.channels) <= set(grant.channels):
            return "the token does not grant every channel of the connection"
        if grant.filters != old.filters:
            return "the filters claim differs: open a new connection for other filters"
        # The connection keeps the mode it was admitted with (and its write budget): a wider
        # token refreshes it, never widens it.
        return dataclasses.replace(grant, mode=old.mode) if grant.mode != old.mode else grant

    def release(self, held: Held, network: str) -> None:
        """Give back what ``held`` holds (when its connection ends, however)."""
        if held.slot:
            self.slots -= 1
            held.slot = False
        self._budget.release(held.channels, held.filters, held.claimed, network)
        held.channels, held.filters = (), filters.NONE
