"""Attacks by a token holder (often only a read token: the Econia recipe hands one to the
public), each reproduced against the real relay, with the bound that now stops it.

Every test here failed before its fix; what each bounds, and the figures before and after, are
in docs/security.md.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import pty
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import jwt
import pytest
import trio
from websockets.exceptions import ConnectionClosed

from relay.wire import frames, positions, proxy
from tests.e2e.test_admin import admin_port, get
from tests.e2e.test_websocket import rejection, ws
from tests.helpers import RELAY, RelayProcess, eventually, notify, relay_env, tls_files, token


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return [child for child in found if _alive(child)]


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return answer.read().decode()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _meta_event(meta, payload: str) -> dict:
    while True:
        message = json.loads(meta.recv(timeout=10))
        if message["payload"] == payload:
            return message


def _delivers(relay: RelayProcess, channel: str = "c") -> None:
    """A new client of ``channel`` receives a notification: the relay serves."""
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    with ws(relay, f"/{channel}/{token({'mode': 'r'})}") as client:
        text = json.dumps({"channel": channel, "n": os.urandom(4).hex()})
        notify(listen, text)
        assert client.recv(timeout=10) == text


# -- a claim with a lone surrogate ---------------------------------------------------------------

def test_a_claim_with_a_lone_surrogate_is_published_escaped_and_the_relay_goes_on(
        start_relay) -> None:
    relay = start_relay(PGWS_META_CHANNEL="meta")
    with ws(relay, f"/meta/{token({'mode': 'r'})}") as meta:
        # What JSON.stringify and json.dumps write for a user-chosen name cut in half.
        with ws(relay, f"/{token({'mode': 'r', 'channels': ['a'], 'name': chr(0xD800)})}"):
            opened = _meta_event(meta, "a")
        closed = _meta_event(meta, "a")
    assert opened["claims"]["name"] == closed["claims"]["name"] == "\ufffd"
    _delivers(relay)
    assert "Traceback" not in relay.log


def test_a_worker_that_dies_is_started_again_and_the_others_keep_their_clients(
        start_relay) -> None:
    port, admin = _free_port(), _free_port()
    relay = start_relay(wait=False, PGWS_WORKERS="2", PGWS_PORT=str(port),
                        PGWS_ADMIN_PORT=str(admin))
    relay.port = port
    first, _ = relay.wait_for_line_at(r"\[worker \d\] .*listening on channel")
    relay.wait_for_line(r"\[worker \d\] .*listening on channel", start=first + 1)
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    assert "pgws_worker_restarts_total 0.0" in _metrics(admin)
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(ws(relay, f"/c/{token({'mode': 'r'})}"))
                   for _ in range(32)]  # All 32 on one worker: a chance of 2^-31.
        workers = _children(relay.proc.pid)
        assert len(workers) == 2
        start = len(relay.lines)
        os.kill(workers[0], signal.SIGKILL)  # As the kernel's OOM killer would.
        relay.wait_for_line(r"worker \d died \(signal 9\); starting it again", start=start)
        relay.wait_for_line(r"\[worker \d\] .*listening on channel", start=start)
        notify(listen, '{"channel":"c","n":1}')
        alive = 0
        for client in clients:
            try:
                assert client.recv(timeout=10) == '{"channel":"c","n":1}'
                alive += 1
            except ConnectionClosed:
                pass  # A client of the killed worker.
        assert 0 < alive < 32
        assert relay.proc.poll() is None
        assert len(eventually(lambda: len(_children(relay.proc.pid)) == 2
                              and _children(relay.proc.pid))) == 2
    for _ in range(8):  # New connections reach both workers again.
        _delivers(relay)
    assert "pgws_worker_restarts_total 1.0" in _metrics(admin)
    relay.signal(signal.SIGTERM)
    assert relay.wait_exit(15) == 0


def test_a_lone_surrogate_claim_with_workers_stops_nothing(start_relay) -> None:
    port = _free_port()
    relay = start_relay(wait=False, PGWS_WORKERS="2", PGWS_PORT=str(port),
                        PGWS_META_CHANNEL="meta")
    relay.port = port
    first, _ = relay.wait_for_line_at(r"\[worker \d\] .*listening on channel")
    relay.wait_for_line(r"\[worker \d\] .*listening on channel", start=first + 1)
    for _ in range(6):  # The kernel spreads them over both workers.
        with ws(relay, f"/{token({'mode': 'r', 'channels': ['a'], 'name': chr(0xDFFF)})}"):
            pass
    _delivers(relay)
    assert "died" not in relay.log and "stopping the others" not in relay.log
    assert relay.proc.poll() is None
    assert rejection(relay, "/a/not-a-token")[0] == 400


def test_workers_end_with_a_supervisor_killed_outright(start_relay) -> None:
    port = _free_port()
    relay = start_relay(wait=False, PGWS_WORKERS="2", PGWS_PORT=str(port))
    first, _ = relay.wait_for_line_at(r"\[worker \d\] .*listening on channel")
    relay.wait_for_line(r"\[worker \d\] .*listening on channel", start=first + 1)
    workers = _children(relay.proc.pid)
    assert len(workers) == 2
    relay.proc.kill()  # SIGKILL: the supervisor cannot pass anything on.
    relay.proc.wait(10)

    eventually(lambda: not any(map(_alive, workers)), what="the workers to end")
    with socket.socket() as probe:  # Nothing holds the port any more.
        assert probe.connect_ex(("127.0.0.1", port)) != 0


# -- caps that raced: connections and filter sets held before any checkpoint ---------------------

def _upgrade(path: str, subprotocol: str | None = None) -> bytes:
    """A WebSocket handshake request for ``path``."""
    extra = f"Sec-WebSocket-Protocol: {subprotocol}\r\n" if subprotocol else ""
    return (f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


def _status_line(sock: socket.socket) -> bytes:
    """The answer's first line, or b"" when the connection ended (or was reset) without one."""
    answer = b""
    with contextlib.suppress(ConnectionResetError):
        while b"\r\n" not in answer:
            data = sock.recv(4096)
            if not data:
                return b""
            answer += data
    return answer.split(b"\r\n", 1)[0]


def _status(sock: socket.socket) -> int:
    """The answer's HTTP status, 0 when there was none."""
    line = _status_line(sock)
    return int(line.split(b" ", 2)[1]) if line else 0


def _handshakes_at_once(relay: RelayProcess, paths: list[str],
                        subprotocol: str | None = None) -> list[int]:
    """Send every handshake before reading any answer; each one's HTTP status, in order (the
    sockets stay open until all are read, so the accepted ones are all connected at once)."""
    socks = [socket.create_connection(("127.0.0.1", relay.port), timeout=10) for _ in paths]
    for sock, path in zip(socks, paths, strict=True):  # All connected first, then all sent.
        sock.sendall(_upgrade(path, subprotocol))
    try:
        statuses = [_status(sock) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    return statuses


def _filtered(channel: str, n: int, claims: dict | None = None) -> str:
    return f"/{channel}/{token({'mode': 'r', **(claims or {})})}?filter=payload.n=eq.{n}"


def test_handshakes_arriving_together_cannot_pass_the_filter_set_cap(start_relay) -> None:
    # Before: 41 of 200 simultaneous handshakes were accepted with a cap of 10.
    relay = start_relay(PGWS_MAX_FILTER_SETS="10", PGWS_MAX_FILTER_SETS_PER_IP="0")
    statuses = _handshakes_at_once(relay, [_filtered("c", n) for n in range(200)])
    assert statuses.count(101) == 10 and statuses.count(503) == 190
    _delivers(relay)


def test_handshakes_arriving_together_cannot_pass_the_connection_cap(start_relay) -> None:
    # Before: 14 accepted with a cap of 10.
    relay = start_relay(PGWS_MAX_CONNECTIONS="10")
    statuses = _handshakes_at_once(relay, [f"/c/{token({'mode': 'r'})}"] * 60)
    assert statuses.count(101) == 10 and statuses.count(503) == 50
    _delivers(relay)  # The slots came back when those sockets closed.


def test_clients_parked_on_a_forged_position_count_against_the_filter_set_cap(
        start_relay) -> None:
    # Before: cap 5, 40 sets accepted: a client resuming from a position no relay issued waits
    # 2 s outside any stream, and its set was not counted until it joined one.
    relay = start_relay(PGWS_MAX_FILTER_SETS="5", PGWS_MAX_FILTER_SETS_PER_IP="0")
    forged = f"{'ab' * 4}.1.{'cd' * 8}.{int(__import__('time').time()):08x}"
    paths = [_filtered("c", n) + f"&from={forged}" for n in range(40)]
    statuses = _handshakes_at_once(relay, paths, subprotocol="pgws.resume.v1")
    assert statuses.count(101) == 5 and statuses.count(503) == 35


def test_url_filter_sets_cannot_lock_out_a_token_whose_claim_needs_a_set(start_relay) -> None:
    relay = start_relay(PGWS_MAX_FILTER_SETS="3", PGWS_MAX_FILTER_SETS_PER_IP="0")
    with contextlib.ExitStack() as stack:
        # Idle sets that never match (indexed: they cost the relay nothing) fill the URL pool.
        for n in range(3):
            stack.enter_context(ws(relay, _filtered("c", 10_000 + n)))
        assert rejection(relay, _filtered("c", 1)) == (503, b"Too many distinct filters")
        claims = {"filters": ["payload.user=eq.alice"]}
        with ws(relay, f"/c/{token({'mode': 'r', **claims})}") as alice:
            listen = relay.env["PGWS_LISTEN_CHANNEL"]
            text = json.dumps({"channel": "c", "payload": {"user": "alice"}})
            notify(listen, text)
            assert alice.recv(timeout=10) == text


def test_one_address_holds_a_bounded_number_of_distinct_url_filter_sets(start_relay) -> None:
    relay = start_relay(PGWS_MAX_FILTER_SETS_PER_IP="4")
    with contextlib.ExitStack() as stack:
        for n in range(4):
            stack.enter_context(ws(relay, _filtered("c", n)))
        stack.enter_context(ws(relay, _filtered("c", 0)))  # One it holds already.
        assert rejection(relay, _filtered("d", 9)) == (
            503, b"Too many distinct filters from this address")
        # A claim's set is the issuer's, not the address's: not counted.
        stack.enter_context(ws(relay, f"/c/{token({'mode': 'r', 'filters': ['n=eq.1']})}"))
    with ws(relay, _filtered("d", 9)):  # Freed when they closed.
        pass


def test_filter_sets_past_the_cost_cap_are_refused_and_cheap_ones_still_fit(start_relay) -> None:
    relay = start_relay(PGWS_MAX_FILTER_COST="1000", PGWS_MAX_FILTER_SETS_PER_IP="0")
    def deep(value: int) -> str:  # 32 × (4 + 16) = 640 units
        return "&".join(f"filter=payload.{'.'.join(f'k{k}' for k in range(14))}.p{j}=neq.{value}"
                        for j in range(32))

    with ws(relay, f"/c/{token({'mode': 'r'})}?{deep(0)}"):
        assert rejection(relay, f"/c/{token({'mode': 'r'})}?{deep(1)}") == (
            503, b"Too many distinct filters")
        with ws(relay, f"/c/{token({'mode': 'r'})}?filter=payload.n=eq.5"):
            pass


# -- the admin listener ---------------------------------------------------------------------------

def test_idle_connections_from_many_addresses_cannot_starve_the_probes(start_relay) -> None:
    # Before: 64 idle connections made /health and /ready time out, so a balancer or a liveness
    # probe took a healthy relay out.
    relay = start_relay(PGWS_ADMIN_PORT="0")
    port = admin_port(relay)
    idle = []
    try:
        for n in range(100):  # 100 addresses, 127.0.1.1 … : past the per-address cap.
            sock = socket.socket()
            sock.bind((f"127.0.1.{n + 1}", 0))
            sock.connect(("127.0.0.1", port))
            idle.append(sock)
        for path in ("/health", "/ready"):
            assert get(port, path)[0] == 200
    finally:
        for sock in idle:
            sock.close()


def _ask(sock: socket.socket, path: bytes = b"/health") -> bytes:
    """Send one request on an open admin connection; the answer's status line, or b"" when the
    connection was closed without one."""
    sock.settimeout(10)
    try:
        sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    except (ConnectionResetError, BrokenPipeError):
        return b""
    return _status_line(sock)


def test_one_address_holds_a_handful_of_admin_connections(start_relay) -> None:
    relay = start_relay(PGWS_ADMIN_PORT="0")
    port = admin_port(relay)
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(12)]
    try:
        for sock in held[8:]:  # Over the cap: closed before any request (before: held 10 s).
            sock.settimeout(5)
            assert sock.recv(1) == b""
        assert [_ask(sock) for sock in held[:8]] == [b"HTTP/1.1 200 OK"] * 8
    finally:
        for sock in held:
            sock.close()
    assert get(port, "/health")[0] == 200


# -- the client library and `tail` against a hostile server -------------------------------------

class _HostileServer:
    """A server that answers every connection as ``mode`` says: ``deep`` (a resume
    handshake, then a control event nested past the recursion limit), ``escapes`` (a delivery
    whose payload is terminal escape sequences), ``wrong-accept`` (a 101 whose accept key is
    wrong) or ``endless`` (a 400 whose body never ends)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sent = 0
        self.connections = 0
        #: Set when the first connection has been answered and closed.
        self.answered = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # Closed: the test is over.
            with conn, contextlib.suppress(OSError):
                self._answer(conn)
            self.connections += 1
            self.answered.set()

    def _answer(self, conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = conn.recv(4096)
            if not data:
                return
            head += data
        if self.mode == "refusal-escapes":
            body = b"\x1b]0;owned\x07\x1b[2J"
            conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: %d\r\n\r\n"
                         % len(body) + body)
            return
        if self.mode == "endless":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 1000000000\r\n\r\n")
            chunk = b"x" * 16384
            with contextlib.suppress(OSError):
                while self.sent < 1_000_000_000:
                    conn.sendall(chunk)
                    self.sent += len(chunk)
            return
        key = re.search(rb"(?i)sec-websocket-key: *(\S+)", head).group(1)
        accept = base64.b64encode(hashlib.sha1(
            key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        if self.mode == "wrong-accept":
            accept = base64.b64encode(b"not the digest of the key")
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept +
                     b"\r\nSec-WebSocket-Protocol: pgws.resume.v1\r\n\r\n")
        position = "0102abcd.1.fedcba9876543210.675a1b2c"
        if self.mode == "deep":
            conn.sendall(frames.text(b'{"event":' + b"[" * 1000))
        else:
            conn.sendall(frames.text(positions.position_event(position)))
            conn.sendall(frames.text(f"{position}\n\x1b]0;owned\x07\x1b[2J".encode()))
            conn.sendall(frames.text(positions.lost_event("unknown", position)))
        with contextlib.suppress(OSError):
            conn.settimeout(10)
            while conn.recv(4096):
                pass

    def close(self) -> None:
        self.sock.close()


def _tail(port: int, *, stdout: int | None = None,
          stderr: int | None = None) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PGWS_")}
    return subprocess.Popen([RELAY, "tail", f"ws://127.0.0.1:{port}/c"], env=env,
                            stdin=subprocess.DEVNULL, stdout=stdout or subprocess.PIPE,
                            stderr=stderr or subprocess.PIPE, text=True)


def test_a_control_event_nested_past_the_recursion_limit_ends_tail_with_one_line() -> None:
    # Before: RecursionError escaped the library, and tail died with a traceback.
    server = _HostileServer("deep")
    try:
        tail = _tail(server.port)
        _, err = tail.communicate(timeout=30)
    finally:
        server.close()
    assert tail.returncode == 1
    assert err.strip().splitlines()[-1] == (
        "pgws-relay tail: the relay sent a control event that is not JSON")
    assert "Traceback" not in err


def _on_a_terminal(mode: str, stream: str) -> bytes:
    """What ``tail`` shows on a terminal as its ``stream`` (stdout or stderr) from a hostile
    server in ``mode``, up to the line that says "owned"."""
    server = _HostileServer(mode)
    controller, terminal = pty.openpty()
    try:
        tail = _tail(server.port, **{stream: terminal})
        os.close(terminal)
        shown = b""
        with contextlib.suppress(OSError):  # EIO once tail is gone.
            while b"owned" not in shown or b"\n" not in shown.split(b"owned", 1)[1]:
                data = os.read(controller, 4096)
                if not data:
                    break
                shown += data
        tail.send_signal(signal.SIGTERM)
        tail.communicate(timeout=30)
    finally:
        os.close(controller)
        server.close()
    return shown


def test_tail_shows_escape_sequences_on_a_terminal_as_text() -> None:
    # Before: the payload's escapes reached the terminal raw (a new window title, a cleared
    # screen); a pipe still gets the payload exactly.
    shown = _on_a_terminal("escapes", "stdout")
    assert b"\x1b" not in shown and b"\x07" not in shown
    assert b"\\x1b]0;owned\\x07\\x1b[2J" in shown
    piped = _HostileServer("escapes")
    try:
        tail = _tail(piped.port)
        line = tail.stdout.readline()
        tail.send_signal(signal.SIGTERM)
        tail.communicate(timeout=30)
    finally:
        piped.close()
    assert line == "\x1b]0;owned\x07\x1b[2J\n"


async def test_a_refusal_whose_body_never_ends_is_not_read_past_a_bound() -> None:
    # Before: the library read the body for the whole connect timeout (10 s), into memory.
    from relay.client.subscription import MAX_HANDSHAKE_ANSWER, subscribe

    server = _HostileServer("endless")
    try:
        async with subscribe(f"ws://127.0.0.1:{server.port}/c", backoff_min=60,
                             backoff_max=60):
            assert await trio.to_thread.run_sync(server.answered.wait, 30)
    finally:
        server.close()
    assert 0 < server.sent < MAX_HANDSHAKE_ANSWER + 8 * 1024 * 1024


async def test_a_server_that_breaks_the_handshake_is_retried_not_raised() -> None:
    # Before: h11's LocalProtocolError escaped the library (tail: a traceback).
    from relay.client.subscription import subscribe

    server = _HostileServer("wrong-accept")
    try:
        async with subscribe(f"ws://127.0.0.1:{server.port}/c", backoff_min=0.01,
                             backoff_max=0.02):
            await trio.to_thread.run_sync(
                lambda: eventually(lambda: server.connections >= 3, what="three attempts"))
    finally:
        server.close()


# -- the console ----------------------------------------------------------------------------------

def test_no_other_site_can_frame_the_console(start_relay) -> None:
    from relay.console import DIRECTORY

    relay = start_relay(PGWS_ROOT_PATH=str(DIRECTORY))
    for path in ("/", "/console.js"):
        with urllib.request.urlopen(relay.url(path, "http"), timeout=10) as answer:
            headers = {name.lower(): value for name, value in answer.headers.items()}
        assert headers["content-security-policy"] == "frame-ancestors 'none'"
        assert headers["x-frame-options"] == "DENY"
        assert headers["x-content-type-options"] == "nosniff"


# -- limits behind a balancer: the PROXY protocol -------------------------------------------------

def _through_balancer(relay: RelayProcess, client: str, path: str,
                      source: str = "127.0.0.1") -> int:
    """Connect from ``source`` as a balancer would, naming ``client`` in a PROXY v2 header; the
    HTTP status of the WebSocket handshake that follows (0: closed without one). The socket is
    kept open (in ``_kept``) until the test ends."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", relay.port))
    _kept.append(sock)
    sock.sendall((proxy.header(client, 40000) if client else b"") + _upgrade(path))
    return _status(sock)


_kept: list[socket.socket] = []


@pytest.fixture
def kept_sockets():
    yield _kept
    while _kept:
        _kept.pop().close()


def test_per_address_limits_count_the_client_a_trusted_balancer_names(
        start_relay, kept_sockets) -> None:
    relay = start_relay(PGWS_PROXY_PROTOCOL_FROM="127.0.0.1/32",
                        PGWS_MAX_CONNECTIONS_PER_IP="2")
    path = f"/c/{token({'mode': 'r'})}"
    # Three clients behind one balancer: each has its own count (before: one address for all).
    assert [_through_balancer(relay, f"203.0.113.{n}", path) for n in (1, 2, 3)] == [101] * 3
    # One client that opens three: its third is over its own cap.
    assert [_through_balancer(relay, "198.51.100.9", path) for _ in range(3)] == [101, 101, 503]
    # From the balancer without a header: closed, not served as its own address.
    assert _through_balancer(relay, "", path) == 0
    # Anyone else sends no header, and a header from them is not believed: not HTTP.
    assert _through_balancer(relay, "", path, source="127.0.0.2") == 101
    assert _through_balancer(relay, "192.0.2.1", path, source="127.0.0.2") == 400


def test_resumes_from_one_address_are_rate_limited_and_others_still_resume(start_relay) -> None:
    # Before: nothing limited how often a client resumed (each replay up to 450 ms of work).
    relay = start_relay(PGWS_MAX_RESUMES_PER_SECOND_PER_IP="1")
    with ws(relay, f"/c/{token({'mode': 'r'})}", subprotocols=["pgws.resume.v1"]) as client:
        position = positions.read(client.recv(timeout=10)).position
    path = f"/c/{token({'mode': 'r'})}?from={position}"
    statuses = _handshakes_at_once(relay, [path] * 5, subprotocol="pgws.resume.v1")
    assert statuses.count(101) == 2 and statuses.count(429) == 3  # A burst of twice the rate.
    assert rejection(relay, path, subprotocols=["pgws.resume.v1"]) == (
        429, b"Too many resumes from this address")
    other = socket.socket()
    other.bind(("127.0.0.3", 0))
    with contextlib.closing(other):
        other.settimeout(10)
        other.connect(("127.0.0.1", relay.port))
        other.sendall(_upgrade(path, "pgws.resume.v1"))
        assert _status(other) == 101


# -- positions that leaked -----------------------------------------------------------------------

def _window_digest(payloads: list[bytes]) -> int:
    """How positions hashed the stream in the clear: BLAKE2b of the last 8 payloads' BLAKE2b."""
    window = b"".join(hashlib.blake2b(p, digest_size=8).digest() for p in payloads[-8:])
    return int.from_bytes(hashlib.blake2b(window, digest_size=8).digest(), "big")


def test_a_position_reveals_nothing_of_what_the_client_may_not_read(start_relay) -> None:
    # Before: alice's own position event let her test guesses of bob's filtered-out payload
    # offline (the pin below in 0.02 s), and count the notifications of other channels.
    relay = start_relay()
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    sent = [json.dumps({"channel": "c", "payload": {"user": "alice", "n": 1}}).encode(),
            json.dumps({"channel": "c", "payload": {"user": "bob", "pin": "4821"}}).encode()]
    with ws(relay, f"/c/{token({'mode': 'r'})}") as everything:
        notify(listen, *(p.decode() for p in sent))
        assert [everything.recv(timeout=10) for _ in sent] == [p.decode() for p in sent]
    alice = f"/c/{token({'mode': 'r', 'filters': ['payload.user=eq.alice']})}"
    with ws(relay, alice, subprotocols=["pgws.resume.v1"]) as client:
        first = positions.read(client.recv(timeout=10)).position
    seen = positions.parse_position(first)
    assert seen is not None
    guesses = [json.dumps({"channel": "c", "payload": {"user": "bob", "pin": f"{pin:04d}"}}
                          ).encode() for pin in range(10_000)]
    recovered = [g for g in guesses if _window_digest([sent[0], g]) == seen.digest]
    assert recovered == []
    with ws(relay, f"/other/{token({'mode': 'r'})}") as other:
        notify(listen, *(json.dumps({"channel": "other", "n": n}) for n in range(5)))
        for _ in range(5):
            other.recv(timeout=10)
    with ws(relay, alice, subprotocols=["pgws.resume.v1"]) as client:
        second = positions.parse_position(positions.read(client.recv(timeout=10)).position)
    assert second is not None and second.seq - seen.seq != 5
    # Still a position to resume from, on this relay and (same key) any other.
    with ws(relay, alice + f"?from={first}", subprotocols=["pgws.resume.v1"]) as client:
        assert positions.read(client.recv(timeout=10)).event == "resumed"


def test_workers_share_one_random_position_key_when_no_secret_can_give_one(start_relay) -> None:
    """A public-key JWT secret is no shared secret: the supervisor makes one key for all of
    its workers (one warning), so a position resumes on whichever worker a client reaches."""
    from tests.e2e.test_tokens import SIGNER, SIGNING_JWK

    port = _free_port()
    relay = start_relay(wait=False, PGWS_WORKERS="2", PGWS_PORT=str(port),
                        PGWS_JWT_SECRET=json.dumps(SIGNING_JWK))
    relay.port = port
    first, _ = relay.wait_for_line_at(r"\[worker \d\] .*listening on channel")
    relay.wait_for_line(r"\[worker \d\] .*listening on channel", start=first + 1)
    signed = jwt.encode({"mode": "r"}, SIGNER, algorithm="RS256", headers={"kid": "sig-1"})
    with ws(relay, f"/c/{signed}", subprotocols=["pgws.resume.v1"]) as client:
        positions.read(client.recv(timeout=10))  # Where the stream is: no notification yet.
        notify(relay.env["PGWS_LISTEN_CHANNEL"], '{"channel":"c","n":1}')
        position = positions.read(client.recv(timeout=10)).position  # Both workers see it.
    outcomes = set()
    for _ in range(12):  # The kernel spreads them over both workers.
        with ws(relay, f"/c/{signed}?from={position}", subprotocols=["pgws.resume.v1"]) as again:
            outcomes.add(positions.read(again.recv(timeout=10)).event)
    assert outcomes == {"resumed"}
    assert sum("PGWS_POSITION_KEY is unset" in line for line in relay.lines) == 1


# -- checked and fine: kept so --------------------------------------------------------------------

def test_a_resume_replays_only_what_the_token_may_read(start_relay) -> None:
    """The claim's filters apply to the replay and a URL filter cannot widen them; a channel
    the token does not name is neither replayed nor opened; an expired token cannot resume."""
    relay = start_relay()
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    alice = token({"mode": "r", "channels": ["a"], "filters": ["payload.user=eq.alice"]})
    sub = ["pgws.resume.v1"]
    with ws(relay, f"/a/{alice}?filter=payload.user=neq.nobody", subprotocols=sub) as client:
        start = positions.read(client.recv(timeout=10)).position
    sent = [{"channel": "a", "payload": {"user": "alice", "n": 1}},
            {"channel": "a", "payload": {"user": "bob", "n": 2}},
            {"channel": "b", "payload": {"user": "alice", "n": 3}},
            {"channel": "a", "payload": {"user": "alice", "n": 4}}]
    with ws(relay, f"/{token({'mode': 'r', 'channels': ['a', 'b']})}") as everything:
        notify(listen, *map(json.dumps, sent))
        for _ in sent:
            everything.recv(timeout=10)
    with ws(relay, f"/a/{alice}?filter=payload.user=neq.nobody&from={start}",
            subprotocols=sub) as client:
        resumed = positions.read(client.recv(timeout=10))
        replayed = [json.loads(positions.read(client.recv(timeout=10)).payload)["payload"]["n"]
                    for _ in range(resumed.replayed or 0)]
    assert (resumed.event, replayed) == ("resumed", [1, 4])
    assert rejection(relay, f"/b/{alice}?from={start}", subprotocols=sub)[0] == 400
    expired = token({"mode": "r", "channels": ["a"], "exp": 1})
    assert rejection(relay, f"/a/{expired}?from={start}", subprotocols=sub) == (
        400, b"Token expired")


def test_a_newcomer_over_its_address_share_makes_no_one_give_way(start_relay) -> None:
    relay = start_relay(PGWS_ADMIN_PORT="0")
    port = admin_port(relay)
    held = []
    try:
        for n in range(64):  # All 64 slots: the 8 oldest from 127.0.0.1, the rest elsewhere.
            sock = socket.socket()
            sock.bind(("127.0.0.1" if n < 8 else f"127.0.2.{n}", 0))
            sock.connect(("127.0.0.1", port))
            held.append(sock)
        newcomer = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.append(newcomer)
        assert newcomer.recv(1) == b""  # Refused for its address ...
        assert _ask(held[0]) == b"HTTP/1.1 200 OK"  # ... and the oldest was not closed for it.
    finally:
        for sock in held:
            sock.close()


def test_workers_of_a_supervisor_that_is_process_1_keep_running(tmp_path: Path) -> None:
    """In a container the supervisor may be process 1: its workers' parent is then 1 from the
    start, which must not read as an orphaned worker. Needs root for a PID namespace."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("needs root and unshare (util-linux) for a PID namespace")
        pytest.skip("needs root and unshare (util-linux) for a PID namespace")
    port = _free_port()
    relay = RelayProcess(relay_env(PGWS_WORKERS="2", PGWS_PORT=str(port)),
                         prefix=("unshare", "--fork", "--pid", "--kill-child"))
    try:
        first, _ = relay.wait_for_line_at(r"\[worker \d\] .*listening on channel")
        relay.wait_for_line(r"\[worker \d\] .*listening on channel", start=first + 1)
        relay.port = port
        for _ in range(6):
            _delivers(relay)
        assert "died" not in relay.log
    finally:
        relay.stop()


def test_a_trusted_balancer_connection_that_sends_no_header_is_closed_at_the_deadline(
        start_relay, kept_sockets) -> None:
    relay = start_relay(PGWS_PROXY_PROTOCOL_FROM="127.0.0.1", PGWS_HANDSHAKE_TIMEOUT="1")
    silent = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    kept_sockets.append(silent)
    half = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    kept_sockets.append(half)
    half.sendall(proxy.header("203.0.113.5", 1)[:10])  # A header cut short, then nothing.
    assert silent.recv(1) == b"" and half.recv(1) == b""
    assert _through_balancer(relay, "203.0.113.6", f"/c/{token({'mode': 'r'})}") == 101
    assert "Traceback" not in relay.log and "internal error" not in relay.log


@pytest.mark.fault
def test_workers_outlive_the_thread_that_started_them(start_relay) -> None:
    """Trio starts processes from a worker thread that ends after 10 idle seconds; a worker
    bound to that thread's life (PR_SET_PDEATHSIG) was stopped then, and with it the service.
    The wait is what is tested: time passing with nothing else to do."""
    port = _free_port()
    relay = start_relay(wait=False, PGWS_WORKERS="2", PGWS_PORT=str(port))
    relay.port = port
    first, _ = relay.wait_for_line_at(r"\[worker \d\] .*listening on channel")
    relay.wait_for_line(r"\[worker \d\] .*listening on channel", start=first + 1)
    time.sleep(12)
    for _ in range(6):
        _delivers(relay)
    assert "SIGTERM" not in relay.log and "stopping the others" not in relay.log
    assert relay.proc.poll() is None


def test_the_proxy_header_comes_before_a_tls_handshake(start_relay, tmp_path: Path) -> None:
    cert_file, key_file = tls_files(tmp_path)
    relay = start_relay(PGWS_CERTIFICATE_FILE=str(cert_file), PGWS_KEY_FILE=str(key_file),
                        PGWS_PROXY_PROTOCOL_FROM="127.0.0.1", PGWS_MAX_CONNECTIONS_PER_IP="1")
    context = ssl.create_default_context(cafile=str(cert_file))
    opened = []
    try:
        for client in ("203.0.113.1", "203.0.113.2"):  # One each: the cap counts clients.
            raw = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
            raw.sendall(proxy.header(client, 1234))
            tls = context.wrap_socket(raw, server_hostname="localhost")
            opened.append(tls)
            tls.sendall(_upgrade(f"/c/{token({'mode': 'r'})}"))
            assert _status(tls) == 101
    finally:
        for sock in opened:
            sock.close()


def test_tail_shows_a_refusal_s_escape_sequences_on_a_terminal_as_text() -> None:
    """The library's log lines carry the server's text (a refusal's body) to tail's stderr."""
    shown = _on_a_terminal("refusal-escapes", "stderr")
    assert b"owned" in shown and b"\x1b" not in shown and b"\x07" not in shown
