"""Attacks from the first security review against the real relay, and what stops each.

A flood of cheap frames, empty fragments without end, bodies that never come, responses never
read, pipelining without end, a slow TLS reader, a storm of connections from one address. Each
test reproduces the attack over real sockets and asserts the bounded outcome; on the code
before the fixes each of them failed (the relay froze, held the connection, or dropped the
reader). How fast the others are served meanwhile is measured by ``bench/reliability/flood.py``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import ssl
import struct
import threading
import time
from pathlib import Path

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Pong, Request, TextMessage

from bench.parts.harness import frame
from relay.transports.websocket import MAX_FRAGMENTS
from tests.e2e.test_websocket import rejection, ws
from tests.helpers import (
    TIMEOUT,
    RelayProcess,
    eventually,
    notify,
    raw_client,
    tls_files,
    token,
)

#: A fault suite: its own stage in CI (`pytest -m fault`), not the default run.
pytestmark = pytest.mark.fault

READ = token({"mode": "r"})
RW = token({"mode": "rw"})
#: Both inbound budgets off: only the reader's own yields stand between a flood and the others.
NO_BUDGET = {"PGWS_MAX_CLIENT_FRAMES_PER_SECOND": "0", "PGWS_MAX_CLIENT_BYTES_PER_SECOND": "0"}


class Flood:
    """A thread that writes ``chunk`` to ``sock`` again and again until stopped or refused."""

    def __init__(self, sock: socket.socket, chunk: bytes) -> None:
        self._sock = sock
        self._chunk = chunk
        self._stop = threading.Event()
        self._progress = threading.Condition()
        self.sent = 0
        self.ended = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._sock.sendall(self._chunk)
                with self._progress:
                    self.sent += len(self._chunk)
                    self._progress.notify_all()
        except OSError:
            pass
        with self._progress:
            self.ended = True
            self._progress.notify_all()

    def wait_sent(self, count: int) -> None:
        with self._progress:
            assert self._progress.wait_for(lambda: self.sent >= count or self.ended, TIMEOUT)
        assert not self.ended, "the flood was refused before it was under way"

    def __enter__(self) -> Flood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(TIMEOUT)


def _events_until_close(sock: socket.socket, conn: WSConnection
                        ) -> tuple[list[object], CloseConnection]:
    """Every event the relay sends up to its close frame, and the close."""
    events: list[object] = []
    sock.settimeout(TIMEOUT)
    while True:
        data = sock.recv(65536)
        if not data:
            raise AssertionError(f"closed without a close frame after {len(events)} events")
        conn.receive_data(data)
        for event in conn.events():
            if isinstance(event, CloseConnection):
                return events, event
            events.append(event)


def _close_of(sock: socket.socket, conn: WSConnection) -> tuple[int, str]:
    close = _events_until_close(sock, conn)[1]
    return close.code, close.reason


def _http(port: int, request: bytes) -> bytes:
    """Send a raw request; everything the relay answers until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


# -- 2. one client cannot freeze the relay ------------------------------------------------------

def test_a_flood_of_cheap_frames_freezes_no_one(start_relay) -> None:
    """With both budgets off, a client keeping its socket full of empty frames (~15 µs each to
    parse) used to hold the event loop: no `GET /`, no delivery, no `exp`, no SIGTERM."""
    relay = start_relay(**NO_BUDGET)
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    expiring = token({"mode": "r", "exp": time.time() + 4})
    sock, conn = raw_client(relay.port, f"/flood/{expiring}")
    with Flood(sock, frame(1, b"", mask=b"mask") * 10_000) as flood:
        flood.wait_sent(1 << 20)
        assert _http(relay.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                     ).startswith(b"HTTP/1.1 200 ")
        with ws(relay, f"/news/{READ}") as other:
            notify(listen, '{"channel":"news","n":1}')
            assert other.recv(timeout=TIMEOUT) == '{"channel":"news","n":1}'
        assert not flood.ended  # All the while, the flood went on.
        # The token's exp fires in the middle of the flood.
        assert _close_of(sock, conn) == (3001, "JWT expired")
        relay.signal(signal.SIGTERM)
        assert relay.wait_exit() == 0


def test_a_client_over_its_frame_budget_is_closed_with_1008(start_relay) -> None:
    relay = start_relay(PGWS_MAX_CLIENT_FRAMES_PER_SECOND="200")
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    sock, conn = raw_client(relay.port, f"/c/{READ}")
    sock.sendall(frame(9, b"ping") * 100)  # Within the budget: every ping gets its pong.
    pongs = 0
    while pongs < 100:
        conn.receive_data(sock.recv(65536))
        pongs += sum(isinstance(event, Pong) for event in conn.events())
    with ws(relay, f"/c/{READ}") as other:
        # Frames that get no answer: pongs the client does not read could fill its window,
        # and then the relay's reset (it reads no more of a flooder) would discard the close.
        with contextlib.suppress(OSError):
            sock.sendall(frame(1, b"") * 2000)
        assert _close_of(sock, conn) == (1008, "too many frames")
        notify(listen, '{"channel":"c"}')
        assert other.recv(timeout=TIMEOUT) == '{"channel":"c"}'
    assert relay.stats()["inbound_limited"] == 1


def test_a_client_over_its_byte_budget_is_closed_with_1008(start_relay) -> None:
    relay = start_relay(PGWS_MAX_CLIENT_BYTES_PER_SECOND="65536")
    sock, conn = raw_client(relay.port, f"/c/{READ}")
    with contextlib.suppress(OSError):
        sock.sendall(frame(1, b"x" * 4000) * 50)  # 200 KB at once: three times the budget.
    assert _close_of(sock, conn) == (1008, "too many bytes")


# -- 4. fragments are counted ------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["r", "rw"])
def test_a_message_of_endless_empty_fragments_is_closed_with_1009(start_relay, mode: str) -> None:
    relay = start_relay(**NO_BUDGET)
    sock, conn = raw_client(relay.port, f"/c/{token({'mode': mode})}")
    empty = frame(0, b"", fin=False, mask=b"mask")
    with contextlib.suppress(OSError):
        sock.sendall(frame(1, b"", fin=False) + empty * MAX_FRAGMENTS)
    assert _close_of(sock, conn) == (1009, "too many fragments")


def test_a_message_of_as_many_fragments_as_allowed_is_published(start_relay) -> None:
    relay = start_relay(**NO_BUDGET)
    sock, conn = raw_client(relay.port, f"/c/{RW}")
    pieces = [frame(1, b"a", fin=False)]
    pieces += [frame(0, b"a", fin=False)] * (MAX_FRAGMENTS - 2) + [frame(0, b"a")]
    sock.sendall(b"".join(pieces))
    sock.settimeout(TIMEOUT)
    while True:
        conn.receive_data(sock.recv(65536))
        texts = [event for event in conn.events() if isinstance(event, TextMessage)]
        if texts:
            break
    assert json.loads(texts[0].data)["payload"] == "a" * MAX_FRAGMENTS


# -- 3. connections that never become clients are bounded in time -----------------------------

def test_a_body_that_never_comes_is_cut_at_the_handshake_timeout(start_relay) -> None:
    # A send timeout beyond the reads' own timeout: only the request's deadline can cut them.
    relay = start_relay(PGWS_HANDSHAKE_TIMEOUT="1", PGWS_SEND_TIMEOUT="60")
    request = b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"
    socks = [socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT)
             for _ in range(50)]
    try:
        for sock in socks:
            sock.sendall(request)
        for sock in socks:
            answer = b""
            while chunk := sock.recv(4096):  # Until the relay closes it (a timeout fails).
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"Hello, Web!")
    finally:
        for sock in socks:
            sock.close()


def test_a_client_that_never_reads_a_static_file_is_cut(start_relay, tmp_path: Path) -> None:
    size = 32 << 20
    (tmp_path / "big.bin").write_bytes(b"\0" * size)
    relay = start_relay(PGWS_ROOT_PATH=str(tmp_path), PGWS_SEND_TIMEOUT="1")
    with socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        relay.wait_for_line(r"a deadline passed before it became a client")
        received = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
    assert 0 < received < size


def test_pipelining_without_end_is_cut_after_1000_requests(relay: RelayProcess) -> None:
    answer = _http(relay.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 1100)
    assert answer.count(b"HTTP/1.1 200 ") == 1000
    assert answer.rsplit(b"HTTP/1.1 200 ", 1)[1].lower().count(b"connection: close") == 1


def test_an_idle_keep_alive_connection_is_cut(start_relay) -> None:
    relay = start_relay(PGWS_HANDSHAKE_TIMEOUT="1")
    with socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.count(b"HTTP/1.1 200 ") == 1


def test_each_keep_alive_request_gets_a_deadline_of_its_own(start_relay) -> None:
    """The idle deadline counts from the last answer, not from the connection's first
    request: a client that pauses 2 s between requests keeps its connection."""
    relay = start_relay(PGWS_HANDSHAKE_TIMEOUT="3")
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=TIMEOUT)
    ports = set()
    try:
        for n in range(3):
            if n:
                time.sleep(2)  # The idle client under test, not a wait for something.
            conn.request("GET", "/")
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, b"Hello, Web!")
            ports.add(conn.sock.getsockname()[1])
    finally:
        conn.close()
    assert len(ports) == 1  # One connection throughout.


# -- 10. a slow but live TLS reader gets what a plain one gets ---------------------------------

def _paced_reader(sock: socket.socket, conn: WSConnection, expected: int
                  ) -> tuple[list[str], int | None]:
    """Read 8 KiB every 0.1 s (~80 KB/s: slow, but alive) until ``expected`` texts or a close;
    the texts, and the close code if one came."""
    texts: list[str] = []
    partial = ""
    sock.settimeout(TIMEOUT)
    while len(texts) < expected:
        time.sleep(0.1)  # The pace of the slow reader under test, not a wait for something.
        data = sock.recv(8192)
        if not data:
            break
        conn.receive_data(data)
        for event in conn.events():
            if isinstance(event, CloseConnection):
                return texts, event.code
            if isinstance(event, TextMessage):
                partial += event.data
                if event.message_finished:
                    texts.append(partial)
                    partial = ""
    return texts, None


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
def test_a_slow_live_reader_receives_a_burst_longer_than_the_send_timeout(
        start_relay, tmp_path: Path, tls: bool) -> None:
    settings = {"PGWS_SEND_TIMEOUT": "2", "PGWS_SEND_BUFFER": "8192"}
    if tls:
        cert_file, key_file = tls_files(tmp_path)
        settings.update(PGWS_CERTIFICATE_FILE=str(cert_file), PGWS_KEY_FILE=str(key_file))
    relay = start_relay(**settings)
    plain = socket.socket()
    plain.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    plain.settimeout(TIMEOUT)
    plain.connect(("127.0.0.1", relay.port))
    sock = ssl.create_default_context(cafile=str(tmp_path / "cert.pem")).wrap_socket(
        plain, server_hostname="localhost") if tls else plain
    conn = WSConnection(ConnectionType.CLIENT)
    sock.sendall(conn.send(Request(host="localhost", target=f"/slow/{READ}")))
    while not any(isinstance(event, AcceptConnection) for event in conn.events()):
        conn.receive_data(sock.recv(4096))
    with sock:
        # 400 KB in one commit: ~5 s at this reader's pace, more than twice the send timeout.
        body = "y" * 7_000
        notify(relay.env["PGWS_LISTEN_CHANNEL"],
               *(json.dumps({"channel": "slow", "n": n, "body": body}) for n in range(57)))
        texts, close = _paced_reader(sock, conn, 57)
    assert close is None
    assert [json.loads(text)["n"] for text in texts] == list(range(57))
    assert "slow consumer" not in relay.log


# -- 11. a storm from one address costs a bounded number of descriptors and lines ---------------

def _descriptors(stats: dict[str, int]) -> int:
    """Open descriptors but the NOTIFY pool's, which grows on demand (heartbeats)."""
    return stats["fds"] - stats["db_pool_idle"] - stats["db_pool_busy"]


def test_a_storm_of_silent_connections_over_the_cap_holds_few_descriptors(start_relay) -> None:
    relay = start_relay(PGWS_MAX_CONNECTIONS_PER_IP="1", PGWS_HANDSHAKE_TIMEOUT="10")
    with ws(relay, f"/c/{READ}"):
        before = relay.stats()
        socks = [socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT)
                 for _ in range(300)]
        try:
            during = eventually(lambda: (stats := relay.stats())["rejected"] >= 300 and stats,
                                what="300 refusals")
            assert _descriptors(during) - _descriptors(before) <= 64 + 4
        finally:
            for sock in socks:
                sock.close()
        # Once the storm is over, an over-cap client that sends its request still gets the 503.
        eventually(lambda: _descriptors(relay.stats()) <= _descriptors(before),
                   what="the storm's sockets closed")
        assert rejection(relay, f"/c/{READ}") == (503, b"Too many connections from this address")
    refusal_lines = [line for line in relay.lines if "per-address cap" in line]
    assert 1 <= len(refusal_lines) <= 2, refusal_lines


def test_pings_within_the_budget_are_all_answered(start_relay) -> None:
    """The budget closes floods, not clients that keep to it (every ping answered, in order)."""
    relay = start_relay(PGWS_MAX_CLIENT_FRAMES_PER_SECOND="1000")
    sock, conn = raw_client(relay.port, f"/c/{READ}")
    payloads = [str(n).encode() for n in range(500)]
    sock.sendall(b"".join(frame(9, payload) for payload in payloads))
    answered: list[bytes] = []
    while len(answered) < len(payloads):
        conn.receive_data(sock.recv(65536))
        for event in conn.events():
            assert not isinstance(event, CloseConnection), event
            if isinstance(event, Pong):
                answered.append(bytes(event.payload))
            elif isinstance(event, Ping):
                continue
    assert answered == payloads


# -- what the review found fine, kept so -------------------------------------------------------

def test_a_token_with_100000_channels_gets_431(relay: RelayProcess) -> None:
    huge = token({"mode": "r", "channels": [f"c{n}" for n in range(100_000)]})
    status, _ = rejection(relay, f"/{huge}")
    assert status == 431


def test_a_client_reset_in_the_middle_of_a_write_costs_no_one(start_relay) -> None:
    relay = start_relay(PGWS_SEND_BUFFER="8192")
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    doomed, _ = raw_client(relay.port, f"/c/{READ}", rcvbuf=4096)
    with ws(relay, f"/c/{READ}") as healthy:
        notify(listen, *(json.dumps({"channel": "c", "n": n, "pad": "p" * 7000})
                         for n in range(50)))
        assert json.loads(healthy.recv(timeout=TIMEOUT))["n"] == 0
        # Reset (not closed) while the relay still has most of the 350 KB to write to it.
        doomed.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        doomed.close()
        received = [json.loads(healthy.recv(timeout=TIMEOUT))["n"] for _ in range(49)]
        assert received == list(range(1, 50))
        eventually(lambda: relay.stats()["clients"] == 1, what="the reset client removed")
    assert "Traceback" not in relay.log
