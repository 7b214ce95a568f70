"""Request target → channel and token (upstream's paths, and this project's query and header
ways to pass the token)."""

from __future__ import annotations

import pytest

from relay.transports import request
from relay.transports.request import Target, parse_target
from relay.wire import origins


@pytest.mark.parametrize("target,channel,token", [
    (b"/TOKEN", None, "TOKEN"),
    (b"/chat/TOKEN", "chat", "TOKEN"),
    (b"/a/b/c", "a", "b"),
    (b"/", None, ""),
    (b"/chat/", "chat", ""),
    (b"/TOKEN/", "TOKEN", ""),
    (b"//TOKEN", "", "TOKEN"),
    (b"/my%20chan/T", "my%20chan", "T"),
])
def test_upstream_table(target: bytes, channel: str | None, token: str) -> None:
    assert parse_target(target) == Target(channel, token)


def test_query_string_is_stripped() -> None:
    assert parse_target(b"/chat/TOKEN?x=1") == Target("chat", "TOKEN")
    assert parse_target(b"/TOKEN?x=1") == Target(None, "TOKEN")


def test_jwt_query_parameter() -> None:
    assert parse_target(b"/?jwt=T") == Target(None, "T")
    assert parse_target(b"/chat?jwt=T&x=1") == Target("chat", "T")


def test_bearer_header() -> None:
    headers = [(b"authorization", b"Bearer T")]
    assert parse_target(b"/chat", headers) == Target("chat", "T")
    assert parse_target(b"/", headers) == Target(None, "T")
    assert parse_target(b"/X", [(b"authorization", b"Basic abc")]) == Target(None, "X")


def test_bearer_credentials_are_everything_after_the_scheme() -> None:
    def target(value: bytes) -> Target:
        return parse_target(b"/chat", [(b"Authorization", value)])

    assert target(b"bearer  T ") == Target("chat", "T")  # any case; blanks around trimmed
    assert target(b"  BEARER T") == Target("chat", "T")
    assert target(b"Bearer a b") == Target("chat", "a b")  # the rest, not its last word
    assert target(b"Bearer") == Target(None, "chat")  # no credentials: the path's token
    assert target(b"Bearer   ") == Target(None, "chat")
    assert target(b"Bearerx T") == Target(None, "chat")
    assert target("Bearer \xe9".encode("latin-1")) == Target("chat", "\xe9")


def test_the_first_authorization_header_counts_and_the_query_wins() -> None:
    headers = [(b"x-other", b"Bearer X"), (b"authorization", b"Bearer A"),
               (b"authorization", b"Bearer B")]
    assert parse_target(b"/c", headers) == Target("c", "A")
    assert parse_target(b"/c?jwt=Q", headers) == Target("c", "Q")
    # An empty jwt parameter is no token: the next source is tried.
    assert parse_target(b"/c?jwt=", headers) == Target("c", "A")
    assert parse_target(b"/c?jwt=&jwt=Q2") == Target("c", "Q2")


def test_a_target_without_a_leading_slash_is_split_whole() -> None:
    # An asterisk- or authority-form target: nothing to drop before splitting.
    assert parse_target(b"TOKEN") == Target(None, "TOKEN")
    assert parse_target(b"chat/TOKEN") == Target("chat", "TOKEN")
    assert parse_target(b"") == Target(None, "")


def test_non_utf8_targets_are_decoded_with_replacement() -> None:
    assert parse_target(b"/ch\xffat/T\xfe") == Target("ch\ufffdat", "T\ufffd")


@pytest.mark.parametrize(("value", "key"), [
    ("https://good.example", "https://good.example"),
    ("https://GOOD.Example", "https://good.example"),
    ("HTTPS://good.example", "https://good.example"),
    ("https://good.example:443", "https://good.example"),
    ("http://good.example:80", "http://good.example"),
    ("wss://good.example:443", "wss://good.example"),
    ("ws://good.example:80", "ws://good.example"),
    ("https://good.example:80", "https://good.example:80"),
    ("http://good.example:443", "http://good.example:443"),
    ("https://good.example:08443", "https://good.example:8443"),
    ("https://[::1]:8443", "https://[::1]:8443"),
    ("https://[::1]", "https://[::1]"),
    ("null", "null"),
    ("NULL", None),
    ("", None),
    ("good.example", None),
    ("https://", None),
    ("https://good.example/", None),
    ("https://good.example/path", None),
    ("https://good.example?q", None),
    ("https://good.example#f", None),
    ("https://user@good.example", None),
    ("https://good.example, https://other.example", None),
    ("https://good.example:", None),
    ("https://good.example:65536", None),
    ("https://good.example:65535", "https://good.example:65535"),
    ("https://good example", None),
    ("1https://good.example", None),
])
def test_origins_compare_as_rfc_6454_serializations(value: str, key: str | None) -> None:
    assert origins.origin_key(value) == key


def test_filter_parameters_are_collected_decoded_in_order() -> None:
    target = parse_target(b"/fill_event/TOKEN?filter=payload.market_id=eq.7&x=1"
                          b"&filter=payload.user=in.(%220xaa%22,b)&filter=&filter=a=eq.x+y")
    assert (target.channel, target.token) == ("fill_event", "TOKEN")
    assert target.filters == ("payload.market_id=eq.7", 'payload.user=in.("0xaa",b)', "",
                              "a=eq.x y")
    assert parse_target(b"/c/T").filters == ()
    outside = parse_target(b"/c?filter=a=eq.1&jwt=T")
    assert (outside.channel, outside.token, outside.filters) == ("c", "T", ("a=eq.1",))
    bearer = parse_target(b"/c?filter=a=eq.1", [(b"authorization", b"Bearer T")])
    assert (bearer.channel, bearer.token, bearer.filters) == ("c", "T", ("a=eq.1",))


def test_the_first_from_parameter_is_the_position_in_every_token_form() -> None:
    assert parse_target(b"/c/T?from=ab&from=cd").position == "ab"
    assert parse_target(b"/T?from=ab") == Target(None, "T", (), "ab")
    assert parse_target(b"/c?jwt=T&from=a%2Eb").position == "a.b"
    assert parse_target(b"/c?from=", [(b"authorization", b"Bearer T")]) == \
        Target("c", "T", (), "")
    assert parse_target(b"/c/T?fromx=1").position is None


def test_subprotocols_are_every_offer_split_on_commas() -> None:
    headers = [(b"Sec-WebSocket-Protocol", b"chat, pgws.resume.v1 ,"),
               (b"host", b"x"), (b"sec-websocket-protocol", b" other")]
    assert request.subprotocols(headers) == ["chat", "pgws.resume.v1", "other"]
    assert request.subprotocols([]) == []
