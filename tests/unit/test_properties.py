"""Property tests for the pure parts: parsers never raise on any input, frames round-trip,
claims and configuration get a documented answer, limits hold."""

from __future__ import annotations

import json

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, TextMessage

from relay.auth import tokens
from relay.config import SETTINGS, ConfigError, load
from relay.core import envelope
from relay.core.limits import AddressCount, WriteBucket
from relay.transports.request import parse_target
from relay.wire import frames
from tests.unit.auth.test_tokens import hand_signed

KEYS = tokens.load_keys(b"reallyreallyreallyreallyverysafe")


@given(st.binary(max_size=300), st.lists(st.tuples(st.binary(max_size=20),
                                                    st.binary(max_size=60)), max_size=4))
def test_parse_target_never_raises(target: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    result = parse_target(target, headers)
    assert isinstance(result.token, str)


@given(st.text(max_size=300))
def test_any_token_text_is_refused_or_granted_with_an_error_text(text: str) -> None:
    try:
        tokens.check(text, "c", KEYS, 0.0)
    except tokens.AuthError as refused:
        message = str(refused)
        assert message in {tokens.MISSING_MODE, tokens.NO_SIGNATURES, tokens.INVALID_SIGNATURE} \
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


# -- claims, config and limits -----------------------------------------------------------------

_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                     | st.text(max_size=20), lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
_CLAIMS = st.dictionaries(st.sampled_from(["mode", "channel", "channels", "exp", "nbf", "iat",
                                           "aud", "role"]) | st.text(max_size=8), _JSON,
                          max_size=6)


@given(_CLAIMS, st.none() | st.text(max_size=10), st.floats(0, 2e9))
def test_any_signed_claims_are_granted_or_refused_with_a_documented_text(
        claims: dict, requested: str | None, now: float) -> None:
    import jwt

    signed = jwt.encode(claims, "reallyreallyreallyreallyverysafe", algorithm="HS256")
    try:
        grant = tokens.check(signed, requested, KEYS, now)
    except tokens.AuthError as refused:
        message = str(refused)
        assert message in {tokens.MISSING_MODE, tokens.NO_ALLOWED_CHANNELS, tokens.TOKEN_EXPIRED,
                           tokens.NOT_YET_VALID, tokens.ISSUED_AT_FUTURE} \
            or message.startswith("Error: ")
    else:
        # Granted: a string mode, channel claims of the right type (a wrong one fails closed),
        # and channels that the token named, or the URL's when the token names none.
        assert isinstance(grant.mode, str) and grant.channels
        channel, channels = claims.get("channel"), claims.get("channels")
        assert "channel" not in claims or isinstance(channel, str)
        assert "channels" not in claims or (
            isinstance(channels, list) and all(isinstance(item, str) for item in channels))
        named = ({channel} if "channel" in claims else set()) | set(channels or [])
        if named:
            assert all(item in named for item in grant.channels)
        else:
            assert grant.channels == (requested,)


def _right_type(name: str, value: object) -> bool:
    if name == "channel":
        return isinstance(value, str)
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


@given(st.sampled_from(["channel", "channels"]), _JSON, _CLAIMS, st.none() | st.text(max_size=10))
def test_a_channel_claim_of_the_wrong_type_always_refuses_the_token(
        name: str, value: object, others: dict, requested: str | None) -> None:
    # Fail closed: whatever else the token says and whatever the URL asks for.
    if _right_type(name, value):
        return
    claims = {**others, "mode": "rw", name: value}
    try:
        tokens.authorize(claims, requested)
    except tokens.AuthError as refused:
        assert str(refused) == tokens.NO_ALLOWED_CHANNELS
    else:
        raise AssertionError(f"granted with {name}={value!r}")


_HEADER_MEMBERS = st.sampled_from(["alg", "kid", "typ", "cty", "crit", "jku", "x5u", "x5c", "x5t",
                                   "x5t#S256", "jwk", "b64", "enc", "zip"]) | st.text(max_size=8)


@given(st.dictionaries(_HEADER_MEMBERS, _JSON, max_size=4) | _JSON, st.booleans())
def test_any_header_with_a_valid_signature_is_granted_or_refused_with_a_text(
        members: object, keep_alg: bool) -> None:
    # Mostly an HS256 header with odd members; else whatever JSON value, as the whole header.
    header = {"alg": "HS256", **members} if keep_alg and isinstance(members, dict) else members
    try:
        grant = tokens.check(hand_signed(header, {"mode": "r"}), "c", KEYS, 0.0)
    except tokens.AuthError as refused:
        assert str(refused).startswith("Error: ")
    else:
        assert isinstance(header, dict) and header["alg"] == "HS256" and grant.mode == "r"


@given(st.dictionaries(st.sampled_from([s.variable for s in SETTINGS]), st.text(max_size=30),
                       max_size=8))
def test_any_environment_gives_a_config_or_one_error_naming_a_variable(
        env: dict[str, str]) -> None:
    env = {"PGWS_DB_URI": "postgresql://x@localhost/db", "PGWS_JWT_SECRET": "s", **env}
    env = {key: value for key, value in env.items() if not value.startswith("@")}  # no files
    try:
        load(env)
    except ConfigError as error:
        assert error.variable.startswith("PGWS_") and "\n" not in str(error)


@given(st.floats(0.001, 1000), st.lists(st.floats(0, 10), max_size=50))
def test_a_write_bucket_never_allows_more_than_its_burst_plus_its_rate(
        rate: float, gaps: list[float]) -> None:
    bucket = WriteBucket(rate, 0.0)
    now, allowed = 0.0, 0
    for gap in gaps:
        now += gap
        allowed += bucket.take(now)
    assert allowed <= max(1.0, rate) + rate * now + 1e-6


@given(st.integers(1, 5), st.lists(st.tuples(st.sampled_from("abc"), st.booleans()),
                                   max_size=60))
def test_an_address_never_holds_more_than_its_cap(
        cap: int, steps: list[tuple[str, bool]]) -> None:
    counts = AddressCount(cap)
    held: dict[str, int] = {}
    for address, enter in steps:
        if enter:
            if counts.enter(address):
                held[address] = held.get(address, 0) + 1
        elif held.get(address):
            counts.leave(address)
            held[address] -= 1
        assert all(count <= cap for count in held.values())
    for address, count in held.items():  # Whatever was left, the cap still counts right.
        assert counts.enter(address) == (count < cap)


# -- channels for every mode, routing at any size ----------------------------------------------

MODES = ["r", "w", "rw"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("claims,requested", [
    ({"channels": ["test"]}, "other"),
    ({"channel": "test"}, "other"),
    ({"channel": "test", "channels": ["x", "y"]}, "other"),
    ({"channels": []}, None),  # (with a channel in the URL: any channel, as upstream)
    ({}, None),
    ({"channels": ["test"]}, "TEST"),  # channel names are case-sensitive
    ({"channels": ["test"]}, "test "),
    ({"channels": ["test"]}, ""),
])
def test_no_mode_gets_a_channel_its_token_does_not_name(mode: str, claims: dict,
                                                        requested: str | None) -> None:
    signed = jwt.encode({"mode": mode, **claims}, "reallyreallyreallyreallyverysafe")
    with pytest.raises(tokens.AuthError) as refused:
        tokens.check(signed, requested, KEYS, 0.0)
    assert str(refused.value) == tokens.NO_ALLOWED_CHANNELS


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_gets_exactly_the_channels_its_token_allows(mode: str) -> None:
    def channels(claims: dict, requested: str | None) -> tuple[str, ...]:
        grant = tokens.check(jwt.encode({"mode": mode, **claims},
                                      "reallyreallyreallyreallyverysafe"), requested, KEYS, 0.0)
        assert grant.mode == mode
        assert (grant.can_read, grant.can_write) == ("r" in mode, "w" in mode)
        return grant.channels

    assert channels({"channels": ["a", "b"]}, "b") == ("b",)
    assert channels({"channels": ["a", "b"]}, None) == ("a", "b")
    assert channels({"channel": "a", "channels": ["b", "a"]}, None) == ("a", "b")
    assert channels({"channel": "a", "channels": ["b"]}, "b") == ("b",)
    assert channels({"channels": ["a", "a"]}, None) == ("a", "a")  # upstream's list, as is
    assert channels({}, "any") == ("any",)
    assert channels({"channels": []}, "any") == ("any",)  # an empty list names none: upstream


@given(st.sampled_from(MODES), st.none() | st.lists(st.sampled_from("abc"), max_size=3),
       st.none() | st.sampled_from("abc"), st.none() | st.sampled_from("abcd"))
def test_a_grant_is_the_requested_channel_if_named_else_all_named(
        mode: str, channels: list[str] | None, channel: str | None,
        requested: str | None) -> None:
    claims: dict = {"mode": mode}
    if channels is not None:
        claims["channels"] = channels
    if channel is not None:
        claims["channel"] = channel
    # Spec 3.3: A is c then cs without duplicates, [c], cs as is, or empty (any channel).
    if channel is not None:
        named = list(dict.fromkeys([channel, *(channels or [])]))
    else:
        named = list(channels or [])
    if requested is not None:
        expected = tuple(item for item in named if item == requested) if named \
            else (requested,)
    else:
        expected = tuple(named)
    try:
        grant = tokens.authorize(claims, requested)
    except tokens.AuthError as refused:
        assert str(refused) == tokens.NO_ALLOWED_CHANNELS and expected == ()
    else:
        assert grant.channels == expected and expected


_ABSENT = object()
#: JSON whose objects often have a "channel" member of their own: nested ones must not route.
_NESTED = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=12),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                           st.just("channel") | st.text(max_size=6), inner, max_size=3),
                       max_leaves=8)


@given(st.dictionaries(st.sampled_from(["channel", "pad", "payload"]) | st.text(max_size=6),
                       _NESTED, max_size=5),
       st.text(max_size=12) | st.just(_ABSENT) | _JSON, st.booleans(), st.booleans(),
       st.sampled_from([0, 499, 500, 501, 4000, 7999]) | st.integers(0, 9000))
def test_route_is_the_top_level_string_channel_member(
        others: dict, channel: object, first: bool, ascii_only: bool, pad: int) -> None:
    # Any JSON object, its "channel" member first or last (or absent), nested ones anywhere,
    # non-ASCII raw or escaped, padded past any size threshold.
    others = {key: value for key, value in others.items() if key != "channel"}
    others["padding"] = "x" * pad
    top = {} if channel is _ABSENT else {"channel": channel}
    document = {**top, **others} if first else {**others, **top}
    payload = json.dumps(document, ensure_ascii=ascii_only).encode()
    expected = channel if isinstance(channel, str) else "listen"
    assert envelope.route(payload, "listen") == expected
