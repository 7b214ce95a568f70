"""Server-Sent Events against the real command: what an ``EventSource`` gets, as the spec's
parser reads it (https://html.spec.whatwg.org/multipage/server-sent-events.html)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from relay.wire import positions
from tests.helpers import RelayProcess, notify, token


@dataclass
class Event:
    type: str = "message"
    data: list[str] = field(default_factory=list)
    id: str | None = None

    @property
    def text(self) -> str:
        return "\n".join(self.data)


class Stream:
    """One event-stream request on a bare socket: its status, headers, and events."""

    def __init__(self, relay: RelayProcess, path: str, **headers: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
        lines = [f"GET {path} HTTP/1.1", "Host: localhost", "Accept: text/event-stream",
                 *(f"{name.replace('_', '-')}: {value}" for name, value in headers.items())]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            assert chunk, "closed before the response head"
            self.buffer += chunk
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status, *fields = head.decode().split("\r\n")
        self.status = int(status.split()[1])
        self.headers = {name.lower(): value.strip() for name, value in
                        (line.split(":", 1) for line in fields)}

    def body(self) -> str:
        """The rest of a response that is not a stream (a refusal)."""
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return self.buffer.decode()
            self.buffer += chunk

    def _line(self) -> str | None:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.rstrip(b"\r").decode()

    def events(self) -> Iterator[Event]:
        """Events as the spec's parser dispatches them (comments skipped); ends at EOF."""
        event = Event()
        while (line := self._line()) is not None:
            if line == "":
                if event.data:
                    yield event
                event = Event(id=event.id)
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                event.data.append(value)
            elif name == "event":
                event.type = value
            elif name == "id":
                event.id = value

    def next(self) -> Event:
        return next(self.events())

    def next_delivery(self) -> Event:
        """The next event past the checkpoints' ``position`` events (every 5 s while the
        stream moves, whenever the clock says)."""
        return next(event for event in self.events() if event.type != "position")

    def close(self) -> None:
        self.sock.close()


READ = token({"mode": "r", "channel": "chat"})


def _payload(n: int, **more: object) -> str:
    return json.dumps({"channel": "chat", "n": n, **more})


def test_an_event_stream_gets_each_delivery_with_its_position_as_id(relay: RelayProcess
                                                                     ) -> None:
    stream = Stream(relay, f"/chat/{READ}")
    try:
        assert stream.status == 200
        assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert stream.headers["cache-control"] == "no-cache"
        first = stream.next()
        assert first.type == "position" and first.id is not None
        assert json.loads(first.text) == {"event": "position", "position": first.id}
        listen = relay.env["PGWS_LISTEN_CHANNEL"]
        notify(listen, _payload(1), '{"channel":"chat",\n"n":2}', _payload(3, on="other"))
        one, two = stream.next_delivery(), stream.next_delivery()
        assert (one.type, one.text) == ("message", _payload(1))
        assert two.text == '{"channel":"chat",\n"n":2}'  # Two data lines, joined again.
        assert one.id and two.id and len({first.id, one.id, two.id}) == 3
        assert all(positions.parse_position(e.id) for e in (one, two))  # type: ignore[arg-type]
    finally:
        stream.close()


def test_last_event_id_resumes_and_is_preferred_to_the_first_urls_from(relay: RelayProcess
                                                                        ) -> None:
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    watcher = Stream(relay, f"/chat/{READ}")  # Says when the relay has what was committed.
    stream = Stream(relay, f"/chat/{READ}")
    try:
        start = stream.next()
        notify(listen, _payload(1), _payload(2))
        seen = [stream.next_delivery(), stream.next_delivery()]
    finally:
        stream.close()
    notify(listen, _payload(3), _payload(4))
    while json.loads(watcher.next_delivery().text)["n"] != 4:
        pass
    watcher.close()
    # A browser's EventSource reconnects to its first URL (here with an older from=) and sends
    # the last id it saw: the header wins.
    again = Stream(relay, f"/chat/{READ}?from={start.id}", Last_Event_ID=seen[-1].id or "")
    try:
        resumed = again.next()
        assert resumed.type == "resumed" and resumed.id == seen[-1].id
        assert json.loads(resumed.text)["replayed"] == 2
        assert [json.loads(again.next_delivery().text)["n"] for _ in range(2)] == [3, 4]
        notify(listen, _payload(5))
        assert json.loads(again.next_delivery().text)["n"] == 5
    finally:
        again.close()


def test_refusals_are_the_websockets_statuses_and_texts(start_relay) -> None:
    relay = start_relay(PGWS_ALLOWED_ORIGINS="https://good.example")
    bad_token = Stream(relay, "/chat/not-a-token")
    assert bad_token.status == 400 and "JWSError" in bad_token.body()
    other_site = Stream(relay, f"/chat/{READ}", Origin="https://evil.example")
    assert (other_site.status, other_site.body()) == (403, "Origin not allowed")
    bad_position = Stream(relay, f"/chat/{READ}", Last_Event_ID="nope")
    assert (bad_position.status, bad_position.body()) == (400, "Invalid position")
    good = Stream(relay, f"/chat/{READ}", Origin="https://good.example")
    try:
        assert good.status == 200
        assert good.headers["access-control-allow-origin"] == "https://good.example"
        assert good.headers["access-control-allow-credentials"] == "true"
    finally:
        good.close()


def test_without_allowed_origins_no_other_site_may_read_the_stream(relay: RelayProcess) -> None:
    stream = Stream(relay, f"/chat/{READ}", Origin="https://any.example")
    try:
        assert stream.status == 200 and "access-control-allow-origin" not in stream.headers
    finally:
        stream.close()


def test_the_tokens_exp_ends_the_stream(relay: RelayProcess) -> None:
    short = token({"mode": "r", "channel": "chat", "exp": int(time.time()) + 1})
    stream = Stream(relay, f"/chat/{short}")
    try:
        events = list(stream.events())  # Returns when the relay ends the response.
        assert {event.type for event in events} == {"position"}
    finally:
        stream.close()


@pytest.mark.parametrize("history", ["0"])
def test_with_history_off_events_have_no_ids(start_relay, history: str) -> None:
    relay = start_relay(PGWS_HISTORY_MESSAGES=history)
    stream = Stream(relay, f"/chat/{READ}")
    try:
        notify(relay.env["PGWS_LISTEN_CHANNEL"], _payload(1))
        event = stream.next_delivery()
        assert (event.type, event.id, event.text) == ("message", None, _payload(1))
    finally:
        stream.close()


def test_an_event_stream_may_follow_a_plain_request_on_the_same_connection(
        relay: RelayProcess) -> None:
    """Browsers open EventSource on the page's kept-alive connection."""
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = b""
        while b"Hello, Web!" not in data:
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
        sock.sendall(f"GET /chat/{READ} HTTP/1.1\r\nHost: localhost\r\n"
                     "Accept: text/event-stream\r\n\r\n".encode())
        data = b""
        while b"event: position" not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        assert data.startswith(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream")
    finally:
        sock.close()


def test_a_token_in_a_cookie_opens_a_stream_and_a_websocket_from_an_allowed_origin(
        start_relay) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    relay = start_relay(PGWS_ALLOWED_ORIGINS="https://good.example")
    cookie = f"pgws_token={READ}"
    same_site = Stream(relay, "/chat", Cookie=cookie, Sec_Fetch_Site="same-origin")
    try:
        assert same_site.status == 200 and same_site.next().type == "position"
    finally:
        same_site.close()
    cross_site = Stream(relay, "/chat", Cookie=cookie, Sec_Fetch_Site="cross-site")
    assert (cross_site.status, cross_site.body()) == (403, "Origin required with a cookie token")
    with connect(relay.url("/chat"), origin="https://good.example",  # type: ignore[arg-type]
                 additional_headers={"Cookie": cookie}, open_timeout=10) as client:
        notify(relay.env["PGWS_LISTEN_CHANNEL"], _payload(1))
        assert json.loads(client.recv(timeout=10))["n"] == 1
    with pytest.raises(InvalidStatus) as refused:
        connect(relay.url("/chat"), origin="https://evil.example",  # type: ignore[arg-type]
                additional_headers={"Cookie": cookie}, open_timeout=10)
    assert refused.value.response.status_code == 403


def test_a_cors_preflight_is_answered_for_allowed_origins_only(start_relay) -> None:
    relay = start_relay(PGWS_ALLOWED_ORIGINS="https://good.example")

    def preflight(origin: str) -> tuple[int, dict[str, str]]:
        sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
        try:
            sock.sendall(f"OPTIONS /chat HTTP/1.1\r\nHost: localhost\r\nOrigin: {origin}\r\n"
                         "Access-Control-Request-Method: GET\r\n"
                         "Access-Control-Request-Headers: authorization, last-event-id\r\n"
                         "\r\n".encode())
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                assert chunk
                data += chunk
        finally:
            sock.close()
        status, *fields = data.split(b"\r\n\r\n")[0].decode().split("\r\n")
        return int(status.split()[1]), {name.lower(): value.strip() for name, value in
                                        (line.split(":", 1) for line in fields)}

    status, headers = preflight("https://good.example")
    assert status == 204
    assert headers["access-control-allow-origin"] == "https://good.example"
    assert "authorization" in headers["access-control-allow-headers"]
    assert "last-event-id" in headers["access-control-allow-headers"]
    assert headers["access-control-allow-credentials"] == "true"
    assert preflight("https://evil.example")[0] == 403
