"""Faults, limits, churn and shutdown under load, end to end.

The real ``pgws-relay`` command against the real PostgreSQL, which some tests stop and start
(``pg_ctlcluster``; with no local cluster to drive they fail under ``CI=true`` and are skipped
elsewhere). Figures such as how soon delivery resumes are measured by
``bench/reliability/faults.py``; these
tests prove the behaviour.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection
from wsproto.events import CloseConnection

from tests.e2e.test_admin import admin_port, get, metric
from tests.e2e.test_websocket import rejection, ws
from tests.helpers import TIMEOUT, RelayProcess, eventually, notify, raw_client, token

#: A fault suite: its own stage in CI (`pytest -m fault`), not the default run.
pytestmark = pytest.mark.fault

READ = token({"mode": "r"})
RW = token({"mode": "rw"})


def _next_event(client: ClientConnection, event: str, reads: int = 20) -> dict[str, Any]:
    """The next meta message of this ``event``, skipping others (ConnectionOpen, …)."""
    for _ in range(reads):
        message = json.loads(client.recv(timeout=TIMEOUT))
        if message.get("event") == event:
            return message
    raise AssertionError(f"no {event} event in {reads} messages")


def test_postgres_restart_keeps_clients_and_shows_the_gap(
        start_relay, postgres_control: Callable[[str], None]) -> None:
    relay = start_relay(PGWS_META_CHANNEL="meta", PGWS_CHECK_LISTENER_INTERVAL="500")
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    with ws(relay, f"/c/{READ}") as reader, ws(relay, f"/meta/{READ}") as meta, \
            ws(relay, f"/chat/{RW}") as writer:
        notify(listen, '{"channel":"c","n":1}')
        assert reader.recv(timeout=TIMEOUT) == '{"channel":"c","n":1}'

        postgres_control("stop")
        lost, _ = relay.wait_for_line_at(r"listener connection lost")
        # A write while the database is away fails loudly: logged, and the client told (1011).
        writer.send("while the database is down")
        with pytest.raises(ConnectionClosed) as info:
            writer.recv(timeout=TIMEOUT)
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (1011, "write failed")
        relay.wait_for_line(r"client write from .* failed")  # Logged, as the close says.

        postgres_control("start")
        relay.wait_for_line(r"listening on channel '[^']+' again after [\d.]+ s without LISTEN "
                            r"\(gap 1\); notifications committed in between are lost",
                            start=lost)
        # The same connections, still open, receive again.
        notify(listen, '{"channel":"c","n":2}')
        assert reader.recv(timeout=TIMEOUT) == '{"channel":"c","n":2}'
        gap = _next_event(meta, "ListenerReconnected")
        assert gap["channel"] == "meta"
        assert gap["payload"]["since"] < gap["payload"]["until"]
        assert gap["claims"] == {"message_delivered_at": gap["payload"]["until"]}

    with ws(relay, f"/chat/{RW}") as again:  # Writes work again.
        again.send("after")
        assert json.loads(again.recv(timeout=TIMEOUT))["payload"] == "after"
    stats = relay.stats()
    assert (stats["gaps"], stats["writes_failed"]) == (1, 1)
    assert "Traceback" not in relay.log


def test_postgres_down_at_start_up(start_relay, postgres_control: Callable[[str], None]) -> None:
    postgres_control("stop")
    relay = start_relay(wait=False, PGWS_META_CHANNEL="meta", PGWS_ADMIN_PORT="0")
    relay.port = int(relay.wait_for_line(r"listening on 127\.0\.0\.1:(\d+)").group(1))
    admin = admin_port(relay)
    # Down for longer than the first retry; clients may connect meanwhile, as upstream.
    relay.wait_for_line(r"listener cannot connect \(attempt 1,")
    eventually(lambda: metric(admin, "pgws_listener_down_seconds_total") > 1.5)
    assert get(admin, "/ready")[0] == 503 and metric(admin, "pgws_listener_up") == 0
    with ws(relay, f"/c/{READ}") as early, ws(relay, f"/meta/{READ}") as meta:
        postgres_control("start")
        relay.wait_for_line(r"listening on channel '[^']+' again after [\d.]+ s without LISTEN "
                            r"\(gap 1\)")
        notify(relay.env["PGWS_LISTEN_CHANNEL"], '{"channel":"c","n":1}')
        assert early.recv(timeout=TIMEOUT) == '{"channel":"c","n":1}'
        assert _next_event(meta, "ListenerReconnected")["channel"] == "meta"
    assert relay.proc.poll() is None


def _eventually_connects(relay: RelayProcess, path: str) -> ClientConnection:
    """Connect, retrying while the relay is still finishing connections just closed."""
    outcome: list[ClientConnection] = []

    def attempt() -> bool:
        try:
            outcome.append(ws(relay, path))
        except InvalidStatus:
            return False
        return True

    eventually(attempt, TIMEOUT, "a connection under the per-address cap")
    return outcome[0]


def test_connections_beyond_the_per_address_cap_get_503(start_relay) -> None:
    relay = start_relay(PGWS_MAX_CONNECTIONS_PER_IP="2")
    with ws(relay, f"/c/{READ}"), ws(relay, f"/c/{READ}"):
        assert rejection(relay, f"/c/{READ}") == (503, b"Too many connections from this address")
    with _eventually_connects(relay, f"/c/{READ}"), _eventually_connects(relay, f"/c/{READ}"):
        pass  # Closed connections give their places back.
    assert relay.stats()["rejected"] >= 1


def test_over_the_per_address_cap_the_503_answers_a_whole_request_head(start_relay) -> None:
    # Answering before the request is sent breaks clients that race their send against the
    # reply; so the 503 waits for the blank line, here split across two sends.
    relay = start_relay(PGWS_MAX_CONNECTIONS_PER_IP="1", PGWS_HANDSHAKE_TIMEOUT="1")
    head = (f"GET /c/{READ} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\n\r").encode()
    with ws(relay, f"/c/{READ}"):
        with socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT) as sock:
            sock.sendall(head)
            readable, _, _ = select.select([sock], [], [], 0.3)
            assert not readable  # Nothing yet: the head is one byte short.
            sock.sendall(b"\n")
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert answer.endswith(b"\r\n\r\nToo many connections from this address")
        with socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT) as sock:
            sock.sendall(head)  # Never finished: cut at the handshake timeout, unanswered.
            assert sock.recv(4096) == b""


def test_a_client_writing_too_fast_is_closed_with_1008(start_relay) -> None:
    # One message per 1,000 s: the second message is over the rate whatever the machine's speed.
    relay = start_relay(PGWS_MAX_WRITES_PER_SECOND="0.001")
    with ws(relay, f"/chat/{RW}") as client:
        client.send("first")
        assert json.loads(client.recv(timeout=TIMEOUT))["payload"] == "first"
        client.send("second")
        with pytest.raises(ConnectionClosed) as info:
            client.recv(timeout=TIMEOUT)  # The close, not an echo of "second".
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1008, "write rate exceeded")
    assert relay.stats()["rate_limited"] == 1


def test_sigterm_with_1000_clients_closes_each_with_1001_and_exits_0(start_relay) -> None:
    relay = start_relay()
    clients = [raw_client(relay.port, f"/c/{READ}") for _ in range(1000)]
    try:
        relay.signal(signal.SIGTERM)
        codes = [_close_code(sock, conn) for sock, conn in clients]
    finally:
        for sock, _ in clients:
            sock.close()
    assert codes == [1001] * 1000
    assert relay.wait_exit(TIMEOUT) == 0


def _close_code(sock: socket.socket, conn: Any) -> int | None:
    while True:
        data = sock.recv(65536)
        if not data:
            return None
        conn.receive_data(data)
        for event in conn.events():
            if isinstance(event, CloseConnection):
                return event.code


def test_connect_disconnect_churn_leaks_nothing(start_relay) -> None:
    relay = start_relay()
    port = relay.port
    before = eventually(lambda: (stats := relay.stats())["db_pool_busy"] == 0 and stats,
                        what="no NOTIFY in flight")
    for n in range(1500):
        sock, conn = raw_client(port, f"/c/{READ}")
        if n % 3 == 0:  # A clean close handshake,
            sock.sendall(conn.send(CloseConnection(code=1000)))
            assert _close_code(sock, conn) == 1000
        elif n % 3 == 1:  # a reset,
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # or a plain close without a word.
    after: dict[str, int] = {}

    def settled() -> bool:
        after.update(relay.stats())
        return (after["clients"] == 0 and after["tasks"] == before["tasks"]
                and after["db_pool_busy"] == 0)

    eventually(settled, TIMEOUT, "every connection gone")
    # The NOTIFY pool (heartbeats) may have grown meanwhile: count every other descriptor.
    assert after["fds"] - after["db_pool_idle"] == before["fds"] - before["db_pool_idle"]
    with ws(relay, f"/c/{READ}") as client:  # And the relay still serves.
        notify(relay.env["PGWS_LISTEN_CHANNEL"], '{"channel":"c"}')
        assert client.recv(timeout=TIMEOUT) == '{"channel":"c"}'


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except OSError:
        return True  # reset


def test_slowloris_connections_are_cut_and_starve_no_one(start_relay) -> None:
    relay = start_relay(PGWS_HANDSHAKE_TIMEOUT="1")
    before = relay.stats()
    request = (f"GET /c/{READ} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\n").encode()
    silent, dribbling = ([socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT)
                          for _ in range(100)] for _ in range(2))
    try:
        with ws(relay, f"/c/{READ}") as client:  # Served while they hang on.
            notify(relay.env["PGWS_LISTEN_CHANNEL"], '{"channel":"c"}')
            assert client.recv(timeout=TIMEOUT) == '{"channel":"c"}'
        # One byte each per round, a round every 0.1 s at most: far more often than any
        # per-read timeout would allow, far too slow to finish the request within the 1 s.
        waiting, sent = set(dribbling), 0
        deadline = time.monotonic() + TIMEOUT
        while waiting and time.monotonic() < deadline:
            for sock in list(waiting):
                try:
                    sock.send(request[sent:sent + 1])
                except OSError:
                    waiting.discard(sock)
            sent += 1
            readable, _, _ = select.select(list(waiting), [], [], 0.1)
            waiting -= {sock for sock in readable if _closed(sock)}
        assert not waiting and sent < len(request)
        assert all(_closed(sock) for sock in silent)
    finally:
        for sock in silent + dribbling:
            sock.close()
    eventually(lambda: relay.stats()["tasks"] == before["tasks"], TIMEOUT, "no task left")
