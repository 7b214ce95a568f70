"""The public surface of the modules others build on, written out: a name added, renamed or
removed fails here until this list changes too (as trio's own test of its exports does:
https://github.com/python-trio/trio/blob/main/src/trio/_tests/test_exports.py).

The client library is what users import; the contracts are what new sources, transports and
encodings implement; the wire modules are shared by the relay and its clients. A change to any
of them is a change to say in the changelog.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

SURFACES = {
    "relay.client.subscription": {
        "Closed", "Endpoint", "Lost", "MAX_HANDSHAKE_ANSWER", "Message", "Refused",
        "STABLE_SECONDS", "Subscription", "SubscriptionError", "UNSUPPORTED", "backoff",
        "subscribe"},
    "relay.core.encoding": {"Encoding"},
    "relay.sources.base": {"Source", "SourceGaveUp", "SourceMisconfigured"},
    "relay.transports.admission": {"Admission", "Admitted", "Held", "Refusal"},
    "relay.wire.closecodes": {
        "GOING_AWAY", "INTERNAL_ERROR", "JWT_EXPIRED", "MESSAGE_TOO_BIG", "MessageRefused",
        "NORMAL", "POLICY_VIOLATION", "TRY_AGAIN_LATER"},
    "relay.wire.events": {"EVENT_STREAM", "EventStream", "MEDIA_TYPE"},
    "relay.wire.frames": {
        "TEXT_FRAMES", "TextFrames", "client_pongs", "close", "compressed_text", "payload_of",
        "ping", "pong",
        "text"},
    "relay.wire.positions": {
        "CLOCK_SKEW", "Control", "Delivery", "EXPIRED", "FROM_PARAMETER", "GAP", "LOST_REASONS",
        "MAX_CONTROL_LENGTH", "MAX_POSITION_LENGTH", "MIN_KEY_BYTES", "Position",
        "ProtocolError", "SUBPROTOCOL", "Sealer", "UNKNOWN", "WINDOW", "delivery", "lost_event",
        "parse_position", "position_event", "read", "resumed_event", "token_event",
        "token_refused_event"},
}


def _public(module_name: str) -> set[str]:
    """The public names a module defines itself (not those it imports)."""
    module = importlib.import_module(module_name)
    return {name for name, value in vars(module).items()
            if not name.startswith("_") and not inspect.ismodule(value)
            and getattr(value, "__module__", module_name) == module_name
            and name not in ("annotations",)}


@pytest.mark.parametrize("module_name", sorted(SURFACES))
def test_the_public_surface_is_what_it_says(module_name: str) -> None:
    assert _public(module_name) == SURFACES[module_name]


@pytest.mark.parametrize("module_name", sorted(SURFACES))
def test_every_public_class_and_function_says_what_it_is_for(module_name: str) -> None:
    module = importlib.import_module(module_name)
    undocumented = [name for name in SURFACES[module_name]
                    if callable(getattr(module, name))
                    and not inspect.getdoc(getattr(module, name))]
    assert undocumented == []
