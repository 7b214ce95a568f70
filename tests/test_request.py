"""Request target → channel and token (spec 2.3, and the query/header additions of section 10)."""

from __future__ import annotations

import pytest

from relay.request import Target, parse_target


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
