"""Property tests for the pure parsers: they never raise on any input, and they round-trip."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, TextMessage

from relay import auth, envelope, frames
from relay.request import parse_target

KEYS = auth.load_keys(b"reallyreallyreallyreallyverysafe")


@given(st.binary(max_size=300), st.lists(st.tuples(st.binary(max_size=20),
                                                    st.binary(max_size=60)), max_size=4))
def test_parse_target_never_raises(target: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    result = parse_target(target, headers)
    assert isinstance(result.token, str)


@given(st.text(max_size=300))
def test_any_token_text_is_refused_or_granted_with_an_error_text(text: str) -> None:
    try:
        auth.check(text, "c", KEYS, 0.0)
    except auth.AuthError as refused:
        message = str(refused)
        assert message in {auth.MISSING_MODE, auth.NO_SIGNATURES, auth.INVALID_SIGNATURE} \
            or message.startswith("Error: ")


@given(st.binary(max_size=500))
def test_route_never_raises(payload: bytes) -> None:
    assert isinstance(envelope.route(payload, "listen"), str)


@given(st.text(max_size=70_000))
def test_text_frames_round_trip(text: str) -> None:
    parser = Connection(ConnectionType.CLIENT)
    parser.receive_data(frames.text(text.encode()))
    events = list(parser.events())
    assert "".join(e.data for e in events if isinstance(e, TextMessage)) == text


#: Close codes a server may send (RFC 6455 7.4), among them the ones this relay uses.
SENDABLE = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1013, 3000, 3001, 4000, 4999]


@given(st.sampled_from(SENDABLE), st.text(max_size=200))
def test_close_frames_round_trip(code: int, reason: str) -> None:
    parser = Connection(ConnectionType.CLIENT)
    parser.receive_data(frames.close(code, reason))
    (event,) = list(parser.events())
    assert isinstance(event, CloseConnection)
    assert reason.startswith(event.reason)
