"""End to end: the real ``pgws-relay`` command, the real PostgreSQL, independent clients.

Clients: the ``websockets`` package (its synchronous client) here, trio-websocket in
``test_e2e_trio.py``, websocket-client in ``test_econia.py``, and raw sockets where a client
must misbehave.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import ssl
import time
from pathlib import Path

import psycopg
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect
from wsproto import ConnectionType, WSConnection
from wsproto.events import CloseConnection, Request, TextMessage

from tests.helpers import (
    DB_URI,
    TIMEOUT,
    RelayProcess,
    notify,
    raw_client,
    tls_files,
    token,
    unreachable_db_uri,
)

RW = token({"mode": "rw"})
RW_MULTI = token({"mode": "rw", "channels": ["test", "secondary"]})


def ws(relay: RelayProcess, path: str, **kwargs):
    return connect(relay.url(path), open_timeout=10, close_timeout=5, **kwargs)


def rejection(relay: RelayProcess, path: str, **kwargs) -> tuple[int, bytes]:
    with pytest.raises(InvalidStatus) as info:
        ws(relay, path, **kwargs)
    response = info.value.response
    return response.status_code, response.body


# -- upstream ServerSpec -----------------------------------------------------------------------

def test_server_spec_1_send_messages(relay: RelayProcess) -> None:
    with ws(relay, f"/test/{RW}") as client:
        client.send("test data")


def test_server_spec_2_receive_messages(relay: RelayProcess) -> None:
    with ws(relay, f"/test/{RW}") as a, ws(relay, f"/test/{RW}") as b:
        b.send("test data")
        message = json.loads(a.recv(timeout=10))
    assert message["payload"] == "test data"
    assert message["channel"] == "test"
    assert message["event"] == "WebsocketMessage"


def test_server_spec_3_send_to_multiple_channels(relay: RelayProcess) -> None:
    with ws(relay, f"/test/{RW}") as a, ws(relay, f"/secondary/{RW}") as b, \
            ws(relay, f"/{RW_MULTI}") as c:
        c.send("test data")
        got_a = json.loads(a.recv(timeout=10))
        got_b = json.loads(b.recv(timeout=10))
    assert (got_a["payload"], got_a["channel"]) == ("test data", "test")
    assert (got_b["payload"], got_b["channel"]) == ("test data", "secondary")


def test_server_spec_4_receive_from_multiple_channels(relay: RelayProcess) -> None:
    with ws(relay, f"/{RW_MULTI}") as a, ws(relay, f"/{RW_MULTI}") as b:
        b.send("test data")
        messages = [json.loads(a.recv(timeout=10)) for _ in range(2)]
    assert [m["payload"] for m in messages] == ["test data", "test data"]
    assert sorted(m["channel"] for m in messages) == ["secondary", "test"]


# -- rejections (upstream's texts) -------------------------------------------------------------

def test_rejections_are_http_400_with_upstream_texts(relay: RelayProcess) -> None:
    cases = {
        f"/test/{token({'mode': 'r', 'channel': 'test', 'exp': 1})}": b"Token expired",
        "/": b"Missing mode",
        f"/test/{token({'channels': ['test']})}": b"Missing mode",
        f"/other/{token({'mode': 'r', 'channels': ['test']})}": b"No allowed channels",
        f"/{token({'mode': 'r'})}": b"No allowed channels",
        f"/test/{token({'mode': 'r'}, 'w' * 32)}": b"Error: JWSError JWSInvalidSignature",
        "/test/abc": b"Error: JWSError (CompactDecodeError Invalid number of parts: "
                     b"Expected 3 parts; got 1)",
    }
    for path, body in cases.items():
        assert rejection(relay, path) == (400, body), path
    assert token({"mode": "r", "channel": "test", "exp": 1}) not in relay.log


@pytest.mark.parametrize("mode", ["r", "w", "rw"])
def test_no_mode_opens_a_channel_its_token_does_not_name(relay: RelayProcess, mode: str) -> None:
    refused = [
        f"/other/{token({'mode': mode, 'channels': ['test']})}",
        f"/other/{token({'mode': mode, 'channel': 'test'})}",
        f"/other/{token({'mode': mode, 'channel': 'test', 'channels': ['x']})}",
        f"/TEST/{token({'mode': mode, 'channels': ['test']})}",
        f"/{token({'mode': mode})}",
        f"/{token({'mode': mode, 'channels': []})}",
        f"/other?jwt={token({'mode': mode, 'channels': ['test']})}",
    ]
    for path in refused:
        assert rejection(relay, path) == (400, b"No allowed channels"), path
    with ws(relay, f"/test/{token({'mode': mode, 'channels': ['x', 'test']})}"):
        pass  # The channel the token names still opens.


def test_a_writer_publishes_only_to_the_channel_it_asked_for(relay: RelayProcess) -> None:
    both = token({"mode": "rw", "channels": ["a", "b"]})
    with ws(relay, f"/a/{token({'mode': 'r'})}") as reader_a, \
            ws(relay, f"/b/{token({'mode': 'r'})}") as reader_b, \
            ws(relay, f"/a/{both}") as writer_a, ws(relay, f"/b/{both}") as writer_b:
        writer_a.send("to a")
        assert json.loads(reader_a.recv(timeout=10))["payload"] == "to a"
        # Committed after "to a": had "to a" gone to b as well, it would arrive first.
        writer_b.send("to b")
        received = json.loads(reader_b.recv(timeout=10))
        assert (received["channel"], received["payload"]) == ("b", "to b")
        # And writer_a reads a only: its echo, then the next echo, nothing of b in between.
        writer_a.send("again")
        echoes = [json.loads(writer_a.recv(timeout=10)) for _ in range(2)]
        assert [(e["channel"], e["payload"]) for e in echoes] == [("a", "to a"), ("a", "again")]


# -- database → clients ------------------------------------------------------------------------

def test_payload_is_forwarded_verbatim(relay: RelayProcess) -> None:
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    with ws(relay, f"/fill_event/{token({'mode': 'r'})}") as client, \
            psycopg.connect(DB_URI, autocommit=True) as db:
        db.execute(
            "SELECT pg_notify(%s, json_build_object('channel', 'fill_event', 'payload', "
            "json_build_object('id', 18446744073709551616000001::numeric, 'name', 'naïve ☃'))"
            "::text)", (listen,))
        text = client.recv(timeout=10)
    assert text == ('{"channel" : "fill_event", "payload" : {"id" : 18446744073709551616000001, '
                    '"name" : "naïve ☃"}}')


def test_unroutable_payloads_go_to_the_listen_channel_name(relay: RelayProcess) -> None:
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    with ws(relay, f"/{listen}/{token({'mode': 'r'})}") as client:
        notify(listen, "plain text", '{"channel": 7}', '{"channel": "elsewhere"}', "[1]")
        received = [client.recv(timeout=10) for _ in range(3)]
        with pytest.raises(TimeoutError):
            client.recv(timeout=0.5)
    assert received == ["plain text", '{"channel": 7}', "[1]"]


def test_channels_outside_the_token_are_not_delivered(relay: RelayProcess) -> None:
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    with ws(relay, f"/{token({'mode': 'r', 'channels': ['a']})}") as client:
        notify(listen, '{"channel": "b", "n": 1}', '{"channel": "a", "n": 2}')
        assert client.recv(timeout=10) == '{"channel": "a", "n": 2}'


def test_routing_at_every_size_up_to_the_notify_limit(relay: RelayProcess) -> None:
    # Payloads around each size threshold, up to PostgreSQL's 7999 bytes, the channel member
    # at the start, middle or end behind nested and quoted "channel" decoys, non-ASCII
    # padding and names (some written with \\u escapes).
    from tests.unit.wire.test_frames_envelope import DECOYS, POSITIONS, routed_payload

    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    names = ["fill_event", "café☃"]
    payloads = {name: [routed_payload(size, name, position, filler, escaped).decode()
                       for size in (160, 499, 500, 501, 4000, 7999) for position in POSITIONS
                       for filler, escaped in (("x", False), ("é", True), ("😀", False))]
                for name in names}
    unroutable = ["{" + DECOYS + ',"pad":"' + "y" * size + '"}' for size in (100, 600, 7800)]
    reader = token({"mode": "r", "channels": names})
    with ws(relay, f"/{reader}") as right, \
            ws(relay, f"/wrong/{token({'mode': 'r'})}") as wrong, \
            ws(relay, f"/{listen}/{token({'mode': 'r'})}") as fallback:
        notify(listen, *(p for pair in zip(*payloads.values(), strict=True)
                         for p in pair), *unroutable)
        received = [right.recv(timeout=10) for _ in range(sum(map(len, payloads.values())))]
        assert [fallback.recv(timeout=10) for _ in unroutable] == unroutable
        # Committed last: a decoy routed to "wrong" would have arrived before it.
        notify(listen, '{"channel":"wrong","sentinel":true}')
        assert wrong.recv(timeout=10) == '{"channel":"wrong","sentinel":true}'
    for name in names:
        assert [text for text in received if json.loads(text)["channel"] == name] == \
            payloads[name]


def test_many_notifications_arrive_in_order(relay: RelayProcess) -> None:
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    payloads = [json.dumps({"channel": "c", "n": n}) for n in range(2000)]
    with ws(relay, f"/c/{token({'mode': 'r'})}") as client:
        for start in range(0, len(payloads), 100):
            notify(listen, *payloads[start:start + 100])
        received = [client.recv(timeout=10) for _ in payloads]
    assert received == payloads


# -- clients → database ------------------------------------------------------------------------

def test_write_envelope_and_echo(relay: RelayProcess) -> None:
    writer_token = token({"mode": "rw", "channel": "chat", "custom": [1, 2]})
    with ws(relay, f"/chat/{writer_token}") as writer, \
            ws(relay, f"/chat/{token({'mode': 'r'})}") as reader:
        writer.send('{"a":1} é')
        seen_by_reader = reader.recv(timeout=10)
        echo = writer.recv(timeout=10)
    assert seen_by_reader == echo
    document = json.loads(echo)
    assert document["channel"] == "chat"
    assert document["event"] == "WebsocketMessage"
    assert document["payload"] == '{"a":1} é'
    claims = document["claims"]
    assert claims["mode"] == "rw" and claims["channel"] == "chat" and claims["custom"] == [1, 2]
    assert abs(claims["message_delivered_at"] - time.time()) < 60
    assert echo.startswith('{"channel":"chat","claims":{"channel":"chat","custom":[1,2],'
                           '"message_delivered_at":')
    assert echo.endswith(',"mode":"rw"},"event":"WebsocketMessage","payload":"{\\"a\\":1} é"}')


def test_binary_messages_are_published_as_text(relay: RelayProcess) -> None:
    with ws(relay, f"/chat/{RW}") as client:
        client.send(b"bytes ok")
        assert json.loads(client.recv(timeout=10))["payload"] == "bytes ok"


def test_read_only_clients_cannot_write_but_get_pongs_and_close(relay: RelayProcess) -> None:
    with ws(relay, f"/chat/{token({'mode': 'r'})}") as reader, \
            ws(relay, f"/chat/{token({'mode': 'r'})}") as other:
        reader.send("ignored")
        assert reader.ping(b"are you there").wait(10)
        with pytest.raises(TimeoutError):
            other.recv(timeout=0.5)
        reader.close()
        assert reader.protocol.close_rcvd is not None
        assert reader.protocol.close_rcvd.code == 1000


def test_write_only_clients_get_no_data(relay: RelayProcess) -> None:
    with ws(relay, f"/chat/{token({'mode': 'w'})}") as writer:
        writer.send("hello")
        with pytest.raises(TimeoutError):
            writer.recv(timeout=0.7)
        assert writer.ping().wait(10)


def test_oversized_client_message_closes_with_1009(start_relay) -> None:
    relay = start_relay(PGWS_MAX_MESSAGE_SIZE="1000")
    with ws(relay, f"/chat/{RW}") as client:
        client.send("x" * 1001)
        with pytest.raises(ConnectionClosed) as info:
            client.recv(timeout=10)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


def test_envelope_over_the_notify_limit_closes_with_1009(relay: RelayProcess) -> None:
    with ws(relay, f"/chat/{RW}") as client:
        client.send("x" * 7990)
        with pytest.raises(ConnectionClosed) as info:
            client.recv(timeout=10)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


# -- meta channel, expiry, pings ---------------------------------------------------------------

def _meta_event(meta, payload: str) -> dict:
    """The next meta message about the connection whose channels are ``payload``; others (the
    meta reader's own ConnectionOpen, which NOTIFYs on other pool connections may overtake)
    are skipped."""
    while True:
        message = json.loads(meta.recv(timeout=10))
        if message["payload"] == payload:
            return message


def test_meta_channel_open_and_close_events(start_relay) -> None:
    relay = start_relay(PGWS_META_CHANNEL="server-info")
    with ws(relay, f"/server-info/{token({'mode': 'r'})}") as meta:
        with ws(relay, f"/{token({'mode': 'r', 'channels': ['a', 'b']})}"):
            opened = _meta_event(meta, "a,b")
        closed = _meta_event(meta, "a,b")
    assert (opened["event"], opened["channel"], opened["payload"]) == (
        "ConnectionOpen", "server-info", "a,b")
    assert opened["claims"]["channels"] == ["a", "b"]
    assert (closed["event"], closed["payload"]) == ("ConnectionClose", "a,b")


def test_exp_closes_with_3001(relay: RelayProcess) -> None:
    expiring = token({"mode": "r", "exp": int(time.time()) + 2})
    with ws(relay, f"/chat/{expiring}") as client, pytest.raises(ConnectionClosed) as info:
        client.recv(timeout=15)
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (3001, "JWT expired")


def test_server_pings(start_relay) -> None:
    relay = start_relay(PGWS_PING_INTERVAL="0.2")
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    conn = WSConnection(ConnectionType.CLIENT)
    sock.sendall(conn.send(Request(host="localhost", target=f"/c/{token({'mode': 'r'})}")))
    payloads: list[bytes] = []
    deadline = time.monotonic() + 10
    while len(payloads) < 2 and time.monotonic() < deadline:
        conn.receive_data(sock.recv(4096))
        for event in conn.events():
            if hasattr(event, "payload") and type(event).__name__ == "Ping":
                payloads.append(bytes(event.payload))
    sock.close()
    assert len(payloads) >= 2
    assert int(payloads[1]) == int(payloads[0]) + 1


# -- plain HTTP --------------------------------------------------------------------------------

def _http_get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_hello_web(relay: RelayProcess) -> None:
    response = _http_get(relay.port, "/anything")
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert response.endswith(b"\r\n\r\nHello, Web!")


def test_static_files(start_relay, tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<p>demo</p>")
    relay = start_relay(PGWS_ROOT_PATH=str(tmp_path))
    index = _http_get(relay.port, "/")
    assert index.startswith(b"HTTP/1.1 200 OK") and index.endswith(b"<p>demo</p>")
    assert b"content-type: text/html" in index.lower()
    assert _http_get(relay.port, "/nope.txt").startswith(b"HTTP/1.1 404")


# -- additions of section 10 -------------------------------------------------------------------

def test_token_in_query_string_or_bearer_header(relay: RelayProcess) -> None:
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    reader = token({"mode": "r"})
    bearer = {"Authorization": f"Bearer {reader}"}
    with ws(relay, f"/q?jwt={reader}") as by_query, \
            ws(relay, "/h", additional_headers=bearer) as by_header, \
            ws(relay, f"/p/{reader}?cache=1") as with_query:
        notify(listen, '{"channel":"q"}', '{"channel":"h"}', '{"channel":"p"}')
        assert by_query.recv(timeout=10) == '{"channel":"q"}'
        assert by_header.recv(timeout=10) == '{"channel":"h"}'
        assert with_query.recv(timeout=10) == '{"channel":"p"}'


def test_max_connections_answers_503(start_relay) -> None:
    relay = start_relay(PGWS_MAX_CONNECTIONS="1")
    with ws(relay, f"/c/{RW}"):
        assert rejection(relay, f"/c/{RW}")[0] == 503
    relay.wait_for_line(r"client .* disconnected")
    with ws(relay, f"/c/{RW}"):
        pass


def test_origin_allow_list(start_relay) -> None:
    relay = start_relay(PGWS_ALLOWED_ORIGINS="https://good.example")
    assert rejection(relay, f"/c/{RW}", origin="https://evil.example")[0] == 403
    with ws(relay, f"/c/{RW}", origin="https://good.example"):
        pass


def _handshake_status(port: int, origin: str | None) -> int:
    """The status a WebSocket request with this exact Origin header value gets."""
    head = (f"GET /c/{RW} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n")
    if origin is not None:
        head += f"Origin: {origin}\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall((head + "\r\n").encode("latin-1"))
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            assert chunk, answer
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def test_origin_allow_list_variants(start_relay) -> None:
    relay = start_relay(PGWS_ALLOWED_ORIGINS="https://other.example, https://good.example")
    cases = {
        "https://good.example": 101,
        "https://other.example": 101,
        None: 101,  # not a browser: no Origin to check
        "https://EVIL.example": 403,
        "HTTPS://EVIL.EXAMPLE": 403,
        "https://Evil.Example": 403,
        "https://evil.example/": 403,
        "https://EVIL.example:443": 403,
        "https://evil.example": 403,
        "http://good.example": 403,
        "https://good.example:8443": 403,
        "https://good.example.evil.example": 403,
        "https://good.example@evil.example": 403,
        "https://evil.example/https://good.example": 403,
        "https://evil.example, https://good.example": 403,
        "https://good.exampl": 403,
        "https://good.example/": 403,  # not an origin's serialization (RFC 6454 6.2)
        "null": 403,
        "": 403,
    }
    assert {origin: _handshake_status(relay.port, origin) for origin in cases} == cases


@pytest.mark.parametrize("allowed,origin", [
    ("https://good.example", "https://GOOD.example"),
    ("https://good.example", "HTTPS://good.example"),
    ("https://good.example", "https://good.example:443"),
    ("https://Good.Example", "https://good.example"),  # what browsers send, whatever is typed
])
def test_origins_equal_by_rfc_6454_are_allowed(start_relay, allowed: str, origin: str) -> None:
    # RFC 6454: scheme and host are case-insensitive (user agents send them in lower case)
    # and the default port is the same origin as none.
    relay = start_relay(PGWS_ALLOWED_ORIGINS=allowed)
    assert _handshake_status(relay.port, "https://EVIL.example") == 403
    assert _handshake_status(relay.port, origin) == 101


# -- slow consumers, recovery, shutdown --------------------------------------------------------

def test_slow_consumer_is_dropped_while_healthy_client_gets_everything(start_relay) -> None:
    relay = start_relay(PGWS_MAX_QUEUE_BYTES="262144", PGWS_CLOSE_TIMEOUT="10")
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    path = f"/c/{token({'mode': 'r'})}"
    stalled, stalled_conn = raw_client(relay.port, path, rcvbuf=4096)
    payloads = [json.dumps({"channel": "c", "n": n, "pad": "x" * 6000}) for n in range(1500)]
    # max_queue=None: the client's reader thread keeps reading while the test produces.
    with ws(relay, path, max_size=None, max_queue=None) as healthy:
        for start in range(0, len(payloads), 20):
            notify(listen, *payloads[start:start + 20])
        received = [healthy.recv(timeout=15) for _ in payloads]
    assert received == payloads
    relay.wait_for_line(r"closing slow consumer")
    # The stalled client, reading at last, finds some frames and then the 1013 close.
    close = None
    while close is None:
        data = stalled.recv(65536)
        if not data:
            break
        stalled_conn.receive_data(data)
        close = next((e for e in stalled_conn.events() if isinstance(e, CloseConnection)), None)
    stalled.close()
    assert close is not None and (close.code, close.reason) == (1013, "slow consumer")


def test_a_slow_consumer_is_closed_exactly_when_its_queue_passes_the_bound(start_relay) -> None:
    """PGWS_MAX_QUEUE_BYTES is the bound, not a multiple of it.

    The stalled client never reads, so the kernel takes what its buffers hold (some KiB)
    and the relay queues the rest. One notification at a time, each of ``frame`` bytes;
    the pacer, a client of the same channel, shows when the hub has offered it, and the
    stats line (SIGUSR1, handled after the hub's pass) tells whether the stalled client was
    closed by it. With ``k`` notifications offered at the close and ``m`` delivered to the
    stalled client before its close frame (everything the kernel had taken, plus at most
    the rest of a frame in flight), the relay held ``(k - 1 - m) * frame`` bytes or more,
    and at most the bound, when it decided: a bound of 2x, or none, fails the first assertion.
    The relay's own log line gives the queued bytes exactly: over the bound with this frame,
    and not over it before.
    """
    bound = 65536
    relay = start_relay(PGWS_MAX_QUEUE_BYTES=str(bound), PGWS_SEND_BUFFER="4096",
                        PGWS_SEND_TIMEOUT="600", PGWS_CLOSE_TIMEOUT="600",
                        PGWS_PING_INTERVAL="3600")
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    path = f"/c/{token({'mode': 'r'})}"
    stalled, stalled_conn = raw_client(relay.port, path, rcvbuf=4096)
    size = 4000
    frame = size + 4  # A 4-byte header: 126 <= size < 65536.

    def payload(n: int) -> str:
        head = f'{{"channel":"c","n":{n:6d},"pad":"'
        return head + "x" * (size - len(head) - 2) + '"}'

    with ws(relay, path) as pacer:
        offered = 0
        # However big the kernel's buffers, 4 MiB is beyond them and beyond 2x the bound.
        while offered < (4 << 20) // frame:
            notify(listen, payload(offered))
            assert pacer.recv(timeout=TIMEOUT) == payload(offered)
            offered += 1
            if relay.stats()["slow_closed"]:
                break
        else:
            raise AssertionError(f"not closed after {offered} notifications")
    line = relay.wait_for_line(r"closing slow consumer .*\((.*), (\d+) bytes queued\)")
    texts: list[str] = []
    partial = ""
    close = None
    while close is None:
        data = stalled.recv(65536)
        assert data, "closed without a close frame"
        stalled_conn.receive_data(data)
        for event in stalled_conn.events():
            if isinstance(event, CloseConnection):
                close = event
            elif isinstance(event, TextMessage):
                partial += event.data
                if event.message_finished:
                    texts.append(partial)
                    partial = ""
    stalled.close()
    assert (close.code, close.reason) == (1013, "slow consumer")
    delivered = len(texts)
    assert texts == [payload(n) for n in range(delivered)]  # A prefix, each frame whole.
    assert (offered - 1 - delivered) * frame <= bound, (offered, delivered)
    assert offered * frame > bound
    assert line.group(1) == "queue over its bound"
    assert bound - frame < int(line.group(2)) <= bound, line.group(0)


def _terminate_listener(application: str = "pgws-relay") -> int:
    with psycopg.connect(DB_URI, autocommit=True) as db:
        rows = db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = %s AND query ILIKE 'LISTEN%%'", (application,)
        ).fetchall()
    return len(rows)


def test_listener_recovers_with_clients_connected(start_relay) -> None:
    relay = start_relay(PGWS_DB_URI=f"{DB_URI}?application_name=pgws-relay-recovery-test")
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    with ws(relay, f"/c/{token({'mode': 'r'})}") as client:
        notify(listen, '{"channel":"c","n":1}')
        assert client.recv(timeout=10) == '{"channel":"c","n":1}'
        assert _terminate_listener("pgws-relay-recovery-test") >= 1
        lost, _ = relay.wait_for_line_at(r"listener connection lost")
        relay.wait_for_line(r"listening on channel", start=lost)
        notify(listen, '{"channel":"c","n":2}')
        assert client.recv(timeout=10) == '{"channel":"c","n":2}'
    assert relay.proc.poll() is None


def test_listener_gives_up_after_retries_and_exits_1(start_relay) -> None:
    relay = start_relay(wait=False, PGWS_RETRIES="3", PGWS_DB_URI=unreachable_db_uri())
    match = relay.wait_for_line(r"listening on 127\.0\.0\.1:(\d+)")
    relay.port = int(match.group(1))
    # The port is open while the database is still being retried, as upstream; when the
    # listener gives up, connected clients are told (1001) before the process exits.
    with ws(relay, f"/c/{token({'mode': 'r'})}") as early:
        with pytest.raises(ConnectionClosed) as info:
            early.recv(timeout=30)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    assert relay.wait_exit(30) == 1
    relay.stop()  # Joins the log reader: every line the process wrote is in relay.log.
    # PGWS_RETRIES=3 allows an outage as long as upstream's 3 attempts span (1 + 2 s); the
    # attempts come every second within it, and the same error is logged once, not each time.
    gave_up = re.search(r"listener gave up: no database connection for \d+ s \((\d+) attempts\)",
                        relay.log)
    assert gave_up is not None and int(gave_up.group(1)) >= 3
    assert relay.log.count("listener cannot connect") == 1
    assert "of the 3 s that PGWS_RETRIES=3 allows" in relay.log
    assert "Traceback" not in relay.log


def test_sigterm_closes_clients_with_1001_and_exits_0(relay: RelayProcess) -> None:
    with ws(relay, f"/c/{token({'mode': 'r'})}") as a, ws(relay, f"/d/{RW}") as b:
        relay.signal(signal.SIGTERM)
        for client in (a, b):
            with pytest.raises(ConnectionClosed) as info:
                client.recv(timeout=10)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    assert relay.wait_exit(10) == 0


def test_tls(start_relay, tmp_path: Path) -> None:
    cert_file, key_file = tls_files(tmp_path)
    relay = start_relay(PGWS_CERTIFICATE_FILE=str(cert_file), PGWS_KEY_FILE=str(key_file))
    context = ssl.create_default_context(cafile=str(cert_file))
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    url = f"wss://localhost:{relay.port}/c/{token({'mode': 'rw'})}"
    with connect(url, ssl=context, open_timeout=10) as client:
        notify(listen, '{"channel":"c","tls":true}')
        assert client.recv(timeout=10) == '{"channel":"c","tls":true}'
        client.send("over tls")
        assert json.loads(client.recv(timeout=10))["payload"] == "over tls"


def test_no_token_or_secret_in_logs(start_relay) -> None:
    relay = start_relay(PGWS_META_CHANNEL="meta")
    secret_token = token({"mode": "rw", "channel": "c"})
    with ws(relay, f"/c/{secret_token}") as client:
        client.send("hi")
        client.recv(timeout=10)
    rejection(relay, f"/x/{secret_token}")
    rejection(relay, f"/c/{token({'mode': 'r'}, 'q' * 32)}")
    relay.signal(signal.SIGTERM)
    relay.wait_exit(10)
    relay.stop()
    for part in secret_token.split("."):
        assert part not in relay.log
    assert os.environ.get("PGWS_JWT_SECRET", "reallyreallyreallyreallyverysafe") not in relay.log


def test_stalled_client_is_aborted_when_its_close_cannot_be_sent(start_relay) -> None:
    relay = start_relay(PGWS_MAX_QUEUE_BYTES="65536", PGWS_CLOSE_TIMEOUT="0.5")
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    stalled, _ = raw_client(relay.port, f"/c/{token({'mode': 'r'})}", rcvbuf=4096)
    for start in range(0, 800, 20):
        notify(listen, *(json.dumps({"channel": "c", "n": n, "pad": "x" * 7000})
                         for n in range(start, start + 20)))
        if any("aborting the connection" in line for line in relay.lines):
            break
    relay.wait_for_line(r"closing slow consumer")
    relay.wait_for_line(r"aborting the connection")
    with pytest.raises(ConnectionResetError):
        while stalled.recv(1 << 20):
            pass
    stalled.close()


def test_silent_connections_are_cut_at_the_handshake_timeout(start_relay) -> None:
    relay = start_relay(PGWS_HANDSHAKE_TIMEOUT="0.3")
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as silent, \
            socket.create_connection(("127.0.0.1", relay.port), timeout=10) as dribbling:
        dribbling.sendall(b"GET / HTTP/1.1\r\n")
        assert silent.recv(1) == b""
        assert dribbling.recv(1) == b""
    with ws(relay, f"/c/{RW}"):
        pass


def test_sigint_is_a_graceful_stop_too(relay: RelayProcess) -> None:
    with ws(relay, f"/c/{RW}") as client:
        relay.signal(signal.SIGINT)
        with pytest.raises(ConnectionClosed) as info:
            client.recv(timeout=10)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    assert relay.wait_exit(10) == 0


def test_ping_flood_without_reading_meets_the_queue_bound(start_relay) -> None:
    from wsproto.events import Ping

    relay = start_relay(PGWS_MAX_QUEUE_BYTES="65536")
    flooder, conn = raw_client(relay.port, f"/c/{token({'mode': 'r'})}", rcvbuf=4096)
    ping = conn.send(Ping(payload=b"p" * 125))
    try:
        for _ in range(200):
            flooder.sendall(ping * 100)
            if any("closing slow consumer" in line for line in relay.lines):
                break
    except (ConnectionResetError, BrokenPipeError):
        pass  # The relay gave up on us first: that is the point.
    relay.wait_for_line(r"closing slow consumer")
    flooder.close()
    with ws(relay, f"/c/{RW}") as healthy:
        assert healthy.ping().wait(10)


def test_keep_alive_plain_http(relay: RelayProcess) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
    for _ in range(3):
        conn.request("GET", "/")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"Hello, Web!")
    conn.request("HEAD", "/")
    head = conn.getresponse()
    assert head.status == 200 and head.read() == b""
    conn.close()


def test_secret_from_a_base64_file(start_relay, tmp_path: Path) -> None:
    import base64

    raw = os.urandom(48)
    secret_file = tmp_path / "secret"
    secret_file.write_text(base64.urlsafe_b64encode(raw).decode() + "\n")
    relay = start_relay(PGWS_JWT_SECRET=f"@{secret_file}", PGWS_JWT_SECRET_BASE64="True")
    with ws(relay, f"/c/{token({'mode': 'rw'}, raw)}") as client:
        client.send("ok")
        assert json.loads(client.recv(timeout=10))["payload"] == "ok"
    assert rejection(relay, f"/c/{RW}") == (400, b"Error: JWSError JWSInvalidSignature")


def test_heartbeat_detects_a_listener_backend_that_stopped_answering(start_relay) -> None:
    app = "pgws-relay-heartbeat-test"
    relay = start_relay(PGWS_DB_URI=f"{DB_URI}?application_name={app}",
                        PGWS_CHECK_LISTENER_INTERVAL="300")
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    with psycopg.connect(DB_URI, autocommit=True) as db:
        (pid,) = db.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                            "AND query ILIKE 'LISTEN%%'", (app,)).fetchone()
    # A stopped backend keeps its TCP connection open but answers nothing: half-open, as far
    # as the relay can tell. Only the heartbeat can notice.
    os.kill(pid, signal.SIGSTOP)
    try:
        with ws(relay, f"/c/{token({'mode': 'r'})}") as client:
            lost, _ = relay.wait_for_line_at(r"listener connection lost \(heartbeat not back")
            relay.wait_for_line(r"listening on channel", start=lost)
            notify(listen, '{"channel":"c","after":"recovery"}')
            assert client.recv(timeout=10) == '{"channel":"c","after":"recovery"}'
    finally:
        os.kill(pid, signal.SIGCONT)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_workers_share_the_port_and_each_delivers(start_relay) -> None:
    port = _free_port()
    relay = start_relay(wait=False, PGWS_WORKERS="2", PGWS_PORT=str(port))
    relay.port = port
    first, _ = relay.wait_for_line_at(r"\[worker \d\] .*listening on channel")
    relay.wait_for_line(r"\[worker \d\] .*listening on channel", start=first + 1)
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(ws(relay, f"/c/{token({'mode': 'r'})}"))
                   for _ in range(16)]
        notify(listen, '{"channel":"c","n":1}')
        assert [client.recv(timeout=10) for client in clients] == ['{"channel":"c","n":1}'] * 16
        # SIGUSR1 reaches every worker: one stats line each, clients adding up to 16.
        start = len(relay.lines)
        relay.signal(signal.SIGUSR1)
        one, first_stats = relay.wait_for_line_at(r"stats: clients=(\d+)", start=start)
        other = relay.wait_for_line(r"stats: clients=(\d+)", start=one + 1)
        assert int(first_stats.group(1)) + int(other.group(1)) == 16
        relay.signal(signal.SIGTERM)
        for client in clients:
            with pytest.raises(ConnectionClosed):
                client.recv(timeout=10)
    assert relay.wait_exit(15) == 0
    assert {m.group(1) for m in (re.search(r"\[worker (\d)\]", line) for line in relay.lines)
            if m} == {"0", "1"}


def test_workers_need_a_fixed_port() -> None:
    import subprocess

    from tests.helpers import RELAY, relay_env

    result = subprocess.run([RELAY], env=relay_env(PGWS_WORKERS="2"), capture_output=True,
                            text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert (result.returncode, result.stderr.strip()) == (
        2, "pgws-relay: PGWS_WORKERS: several workers need a fixed PGWS_PORT, not 0")


def test_a_failing_worker_stops_the_service_with_status_1(start_relay) -> None:
    dead = _free_port()
    relay = start_relay(wait=False, PGWS_WORKERS="2", PGWS_PORT=str(_free_port()),
                        PGWS_RETRIES="1",
                        PGWS_DB_URI=f"postgresql://postgres@127.0.0.1:{dead}/postgres")
    assert relay.wait_exit(30) == 1


def test_frames_sent_with_the_handshake_are_read_at_once(relay: RelayProcess) -> None:
    from wsproto.frame_protocol import FrameProtocol

    writer = FrameProtocol(client=True, extensions=[])
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    conn = WSConnection(ConnectionType.CLIENT)
    handshake = conn.send(Request(host="localhost", target=f"/c/{RW}"))
    # A binary message in two frames, splitting the two bytes of "é", right behind the request.
    sock.sendall(handshake + writer.send_data(b"early \xc3", fin=False)
                 + writer.send_data(b"\xa9", fin=True))
    messages: list[str] = []
    while not messages:
        conn.receive_data(sock.recv(65536))
        messages += [e.data for e in conn.events() if type(e).__name__ == "TextMessage"]
    sock.close()
    assert json.loads(messages[0])["payload"] == "early é"


def test_writes_survive_the_notify_pool_losing_its_connections(start_relay) -> None:
    app = "pgws-relay-pool-test"
    relay = start_relay(PGWS_DB_URI=f"{DB_URI}?application_name={app}")
    with ws(relay, f"/chat/{RW}") as client:
        client.send("before")
        assert json.loads(client.recv(timeout=10))["payload"] == "before"
        with psycopg.connect(DB_URI, autocommit=True) as db:
            killed = db.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s AND query ILIKE 'SELECT pg_notify%%'", (app,)
            ).fetchall()
        assert killed
        # The pooled connection is broken now; the write is retried once on a fresh one.
        client.send("after")
        assert json.loads(client.recv(timeout=10))["payload"] == "after"


def test_a_client_that_has_its_101_receives_every_notification_committed_after_it(
        relay: RelayProcess) -> None:
    """The hub has the client before its handshake's answer leaves: a notification committed
    right after the client read its 101 reaches it (the race is widest when the notification
    follows at once, from a connection already open)."""
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    with psycopg.connect(DB_URI, autocommit=True) as producer:
        for n in range(300):
            sock, conn = raw_client(relay.port, f"/race/{token({'mode': 'r', 'channel': 'race'})}")
            try:
                payload = json.dumps({"channel": "race", "n": n})
                producer.execute("SELECT pg_notify(%s, %s)", (listen, payload))
                assert _next_text(sock, conn) == payload, n
            finally:
                sock.close()


def _next_text(sock: socket.socket, conn: WSConnection) -> str:
    """The next text message on a raw client's socket."""
    parts: list[str] = []
    while True:
        for event in conn.events():
            if isinstance(event, TextMessage):
                parts.append(event.data)
                if event.message_finished:
                    return "".join(parts)
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before the message")
        conn.receive_data(data)
