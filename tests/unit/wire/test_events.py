"""The event-stream encoding's bytes, read back as the spec's parser reads them."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from relay.wire.events import EVENT_STREAM


def _parse(data: bytes) -> list[tuple[str, str | None, str]]:
    """(type, id, data) of each event, per the spec's rules (comments skipped)."""
    found = []
    kind, ident, lines = "message", None, []
    for line in data.decode().replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if line == "":
            if lines:
                found.append((kind, ident, "\n".join(lines)))
            kind, lines = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            lines.append(value)
        elif name == "event":
            kind = value
        elif name == "id":
            ident = value
    return found


_texts = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=200)


@given(payload=_texts, position=st.text("0123456789abcdef.", min_size=1, max_size=51))
def test_a_delivery_reads_back_as_its_payload_with_its_position_as_id(payload: str,
                                                                      position: str) -> None:
    parts = EVENT_STREAM.delivery(position.encode(), payload.encode())
    expected = payload.replace("\r\n", "\n").replace("\r", "\n")
    assert _parse(b"".join(parts)) == [("message", position, expected)]
    if "\n" not in payload and "\r" not in payload:
        assert parts[1] == position.encode() and parts[3] == payload.encode()  # Its parts.


def test_events_are_named_with_their_position_and_pings_are_comments() -> None:
    event = EVENT_STREAM.event("lost", "ab.1.2.3", b'{"event":"lost"}')
    assert event == b'event: lost\nid: ab.1.2.3\ndata: {"event":"lost"}\n\n'
    assert _parse(event) == [("lost", "ab.1.2.3", '{"event":"lost"}')]
    assert EVENT_STREAM.ping(7) == b": 7\n\n" and _parse(EVENT_STREAM.ping(7)) == []
    assert _parse(EVENT_STREAM.message(b"a\nb")) == [("message", None, "a\nb")]
