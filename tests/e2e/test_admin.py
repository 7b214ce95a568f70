"""The admin listener against the real relay and PostgreSQL: probes, readiness, metrics."""

from __future__ import annotations

import contextlib
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect
from wsproto.events import CloseConnection

from tests.helpers import (
    DB_URI,
    RelayProcess,
    eventually,
    notify,
    raw_client,
    token,
    unique_channel,
)

REQUIRED = ("pgws_connections", "pgws_notifications_received_total",
            "pgws_slow_consumers_closed_total", "pgws_listener_up", "pgws_listener_gaps_total")


def admin_port(relay: RelayProcess) -> int:
    return int(relay.wait_for_line(r"admin listening on 127\.0\.0\.1:(\d+)").group(1))


def _lower(headers: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def get(port: int, path: str, method: str = "GET") -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read().decode(), _lower(answer.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), _lower(error.headers)


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of one scrape: (name, sorted labels) → value."""
    status, text, _ = get(port, "/metrics")
    assert status == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def metric(port: int, name: str, **labels: str) -> float:
    return samples(port)[(name, tuple(sorted(labels.items())))]


def ws(relay: RelayProcess, path: str, **kwargs: Any) -> Any:
    return connect(relay.url(path), open_timeout=10, **kwargs)


@pytest.fixture
def admin_relay(start_relay: Callable[..., RelayProcess]) -> Iterator[tuple[RelayProcess, int]]:
    relay = start_relay(PGWS_ADMIN_PORT="0")
    yield relay, admin_port(relay)


def test_health_ready_and_metrics_answer_on_the_admin_port(admin_relay) -> None:
    _, port = admin_relay
    assert get(port, "/health")[:2] == (200, "ok\n")
    assert eventually(lambda: get(port, "/ready")[:2] == (200, "ready\n"))
    status, text, headers = get(port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=")
    names = {sample.name for family in text_string_to_metric_families(text)
             for sample in family.samples}
    for name in (*REQUIRED, "pgws_connections_accepted_total",
                 "pgws_connections_refused_total", "pgws_frames_written_total",
                 "pgws_bytes_written_total", "pgws_client_writes_published_total",
                 "pgws_client_writes_failed_total", "pgws_protocol_errors_total",
                 "pgws_notify_pool_busy", "pgws_notify_pool_idle", "pgws_streams",
                 "pgws_compressors", "pgws_compression_joins_total",
                 "pgws_compression_restarts_total",
                 "pgws_listener_down_seconds_total", "pgws_listener_late_deadlines_total",
                 "pgws_delivery_seconds_bucket",
                 "process_resident_memory_bytes", "process_open_fds"):
        assert name in names, name
    assert get(port, "/nothing")[0] == 404
    assert get(port, "/health", method="POST")[0] == 405
    status, body, headers = get(port, "/metrics", method="HEAD")
    assert status == 200 and body == "" and int(headers["content-length"]) > 1000


def test_the_websocket_port_is_unchanged_by_the_admin_port(admin_relay) -> None:
    relay, _ = admin_relay
    for path in ("/health", "/ready", "/metrics"):
        assert get(relay.port, path)[:2] == (200, "Hello, Web!"), path


def test_no_admin_listener_unless_asked(relay: RelayProcess) -> None:
    relay.wait_for_line(r"listening on channel")
    assert "admin listening" not in relay.log


def test_a_bad_admin_port_is_exit_1_with_one_line(start_relay) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        relay = start_relay(wait=False, PGWS_ADMIN_PORT=str(taken.getsockname()[1]))
        assert relay.wait_exit() == 1
    relay.wait_for_line(r"cannot open the admin listener .*PGWS_ADMIN_PORT")


def test_an_admin_request_head_without_end_is_cut_and_others_are_served(admin_relay) -> None:
    _, port = admin_relay
    with socket.create_connection(("127.0.0.1", port)) as hog:
        hog.sendall(b"GET /health HTTP/1.1\r\nx-pad: " + b"a" * 20000)
        assert get(port, "/health")[0] == 200
        hog.settimeout(10)
        answer = hog.recv(4096)  # h11 refuses the oversized head (431), then closes.
        assert answer.startswith(b"HTTP/1.1 431 ")


def test_metrics_agree_with_what_happened(start_relay) -> None:
    relay = start_relay(PGWS_ADMIN_PORT="0", PGWS_MAX_QUEUE_BYTES="65536",
                        PGWS_SEND_BUFFER="4096", PGWS_CLOSE_TIMEOUT="2",
                        PGWS_ALLOWED_ORIGINS="https://good.example")
    port = admin_port(relay)
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    channel = unique_channel("m")

    # Two readers and one writer; a refused token and a refused Origin. Uncompressed, so that
    # the bytes written can be checked against the frames' sizes.
    with ws(relay, f"/{channel}/{token({'mode': 'r'})}", compression=None) as first, \
            ws(relay, f"/{channel}/{token({'mode': 'r'})}", compression=None) as second, \
            ws(relay, f"/{channel}/{token({'mode': 'rw'})}", compression=None) as writer:
        assert eventually(lambda: metric(port, "pgws_connections") == 3)
        for refused in (lambda: ws(relay, "/c/not-a-token"),
                        lambda: ws(relay, f"/c/{token({'mode': 'r'})}",
                                   origin="https://EVIL.example")):
            with pytest.raises(Exception, match="HTTP 40[03]"):
                refused()
        payloads = [json.dumps({"channel": channel, "n": n}) for n in range(5)]
        notify(listen, *payloads)
        for client in (first, second, writer):
            assert [client.recv(timeout=10) for _ in payloads] == payloads
        writer.send("hello")
        for client in (first, second, writer):
            assert json.loads(client.recv(timeout=10))["payload"] == "hello"

        now = samples(port)
        assert now[("pgws_connections", ())] == 3
        assert now[("pgws_connections_accepted_total", ())] == 3
        assert now[("pgws_connections_refused_total", (("reason", "token"),))] == 1
        assert now[("pgws_connections_refused_total", (("reason", "origin"),))] == 1
        assert now[("pgws_connections_refused_total", (("reason", "capacity"),))] == 0
        # Five notifications and the write's envelope, each to three subscribers.
        assert now[("pgws_notifications_received_total", ())] == 6
        assert now[("pgws_frames_written_total", ())] == 18
        # The echo may arrive before the NOTIFY's own call has returned to count it.
        assert eventually(lambda: metric(port, "pgws_client_writes_published_total") == 1)
        assert now[("pgws_client_writes_failed_total", ())] == 0
        framed = sum(len(p) + 2 for p in payloads)  # Short text frames: two header bytes.
        assert now[("pgws_bytes_written_total", ())] > 3 * framed
        # Every routed notification's last write is in the histogram.
        assert eventually(lambda: metric(port, "pgws_delivery_seconds_count") == 6)
        assert metric(port, "pgws_delivery_seconds_bucket", le="+Inf") == 6

    # A protocol error: an unmasked frame from a client.
    sock, _ = raw_client(relay.port, f"/{channel}/{token({'mode': 'r'})}")
    with sock:
        sock.sendall(b"\x81\x02hi")
        assert eventually(lambda: metric(port, "pgws_protocol_errors_total") == 1)

    # Three slow consumers: clients that never read.
    stalled = [raw_client(relay.port, f"/{channel}/{token({'mode': 'r'})}", rcvbuf=4096)
               for _ in range(3)]
    try:
        assert eventually(lambda: metric(port, "pgws_connections") == 3)
        big = [json.dumps({"channel": channel, "n": n, "pad": "x" * 7000}) for n in range(40)]
        notify(listen, *big)
        assert eventually(lambda: metric(port, "pgws_slow_consumers_closed_total") == 3)
        assert metric(port, "pgws_bytes_dropped_total") > 0
        for sock, conn in stalled:  # Each finds its 1013 after what was written before.
            sock.settimeout(10)
            close = None
            while close is None and (data := sock.recv(65536)):
                conn.receive_data(data)
                close = next((e for e in conn.events() if isinstance(e, CloseConnection)), None)
            assert close is not None and close.code == 1013
    finally:
        for sock, _ in stalled:
            sock.close()
    assert eventually(lambda: metric(port, "pgws_connections") == 0)
    assert metric(port, "pgws_slow_consumers_closed_total") == 3


@pytest.fixture
def login_role() -> Iterator[str]:
    """A role the test can forbid to log in, so that the listener cannot come back."""
    role = unique_channel("pgws_role")
    with psycopg.connect(DB_URI, autocommit=True) as db:
        db.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        yield role
    finally:
        with psycopg.connect(DB_URI, autocommit=True) as db:
            db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE usename = %s", (role,))
            db.execute(f'DROP ROLE IF EXISTS "{role}"')


def _set_login(role: str, allowed: bool) -> None:
    with psycopg.connect(DB_URI, autocommit=True) as db:
        db.execute(f'ALTER ROLE "{role}" {"LOGIN" if allowed else "NOLOGIN"}')


def _terminate_listeners(role: str, limit: int | None = None) -> int:
    with psycopg.connect(DB_URI, autocommit=True) as db:
        pids = [row[0] for row in db.execute(
            "SELECT pid FROM pg_stat_activity WHERE usename = %s AND query ILIKE 'LISTEN%%' "
            "ORDER BY pid", (role,)).fetchall()][:limit]
        for pid in pids:
            db.execute("SELECT pg_terminate_backend(%s)", (pid,))
    return len(pids)


def _role_uri(role: str) -> str:
    return DB_URI.replace("postgres@", f"{role}@", 1)


def test_ready_is_503_while_the_listener_is_away_and_200_when_it_is_back(
        start_relay, login_role: str) -> None:
    relay = start_relay(PGWS_ADMIN_PORT="0", PGWS_DB_URI=_role_uri(login_role),
                        PGWS_RETRIES="12")
    port = admin_port(relay)
    assert eventually(lambda: get(port, "/ready")[0] == 200)
    assert metric(port, "pgws_listener_up") == 1
    _set_login(login_role, False)
    try:
        assert _terminate_listeners(login_role) == 1
        _, reason = eventually(lambda: (answer := get(port, "/ready"))[0] == 503
                                    and answer[:2])
        assert reason.startswith(("listener reconnecting: ", "database unreachable: "))
        assert reason.endswith("\n") and reason.count("\n") == 1
        assert eventually(lambda: "not permitted to log in" in get(port, "/ready")[1])
        assert metric(port, "pgws_listener_up") == 0
        assert get(port, "/health")[0] == 200
        # A permanent error names the setting to fix, in the log.
        relay.wait_for_line(r"not permitted to log in.*check PGWS_DB_URI")
    finally:
        _set_login(login_role, True)
    assert eventually(lambda: get(port, "/ready")[:2] == (200, "ready\n"))
    now = samples(port)
    assert now[("pgws_listener_up", ())] == 1
    assert now[("pgws_listener_gaps_total", ())] == 1
    assert now[("pgws_listener_down_seconds_total", ())] > 0


def test_ready_follows_a_database_stop(start_relay, postgres_control) -> None:
    relay = start_relay(PGWS_ADMIN_PORT="0", PGWS_RETRIES="12")
    port = admin_port(relay)
    assert eventually(lambda: get(port, "/ready")[0] == 200)
    postgres_control("stop")
    try:
        assert eventually(lambda: get(port, "/ready")[0] == 503, timeout=30)
        assert metric(port, "pgws_listener_up") == 0
    finally:
        postgres_control("start")
    assert eventually(lambda: get(port, "/ready")[:2] == (200, "ready\n"), timeout=30)
    assert metric(port, "pgws_listener_gaps_total") == 1


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_stopping_relay_is_not_ready_and_refuses_new_connections(start_relay) -> None:
    relay = start_relay(PGWS_ADMIN_PORT="0", PGWS_SHUTDOWN_TIMEOUT="30")
    port = admin_port(relay)
    # A client that never answers the close keeps the relay in its shutdown for a while.
    sock, _ = raw_client(relay.port, f"/c/{token({'mode': 'r'})}")
    with sock:
        relay.signal()
        relay.wait_for_line(r"closing 1 clients")
        assert get(port, "/ready")[:2] == (503, "shutting down\n")
        assert get(port, "/health")[0] == 200
        # Refused, not queued unanswered until the exit: a balancer retries elsewhere at once.
        assert eventually(lambda: _refused(relay.port), what="the port to refuse connections")
        assert relay.proc.poll() is None  # Still shutting down: the refusal is the drain's.
    assert relay.wait_exit() == 0


def test_one_scrape_shows_every_worker(start_relay, login_role: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    relay = start_relay(wait=False, PGWS_WORKERS="2", PGWS_PORT=str(free),
                        PGWS_ADMIN_PORT="0", PGWS_DB_URI=_role_uri(login_role),
                        PGWS_RETRIES="12")
    relay.port = free
    port = admin_port(relay)
    assert eventually(lambda: get(port, "/ready")[:2] == (200, "ready\n"))
    now = samples(port)
    for worker in ("0", "1"):
        assert now[("pgws_listener_up", (("worker", worker),))] == 1
        assert ("process_open_fds", (("worker", worker),)) in now
    # Three clients, spread by the kernel: the workers' gauges add up to three.
    with contextlib.ExitStack() as stack:
        for _ in range(3):
            stack.enter_context(ws(relay, f"/c/{token({'mode': 'r'})}"))
        assert eventually(lambda: sum(metric(port, "pgws_connections", worker=w)
                                      for w in ("0", "1")) == 3)
    # One worker's listener away: not ready, and the answer says which.
    _set_login(login_role, False)
    try:
        assert _terminate_listeners(login_role, limit=1) == 1
        _, reason = eventually(lambda: (answer := get(port, "/ready"))[0] == 503
                                    and answer[:2])
        assert reason.startswith(("worker 0: ", "worker 1: ")) and ";" not in reason
        assert eventually(lambda: sorted(metric(port, "pgws_listener_up", worker=w)
                                         for w in ("0", "1")) == [0, 1])
    finally:
        _set_login(login_role, True)
    assert eventually(lambda: get(port, "/ready")[:2] == (200, "ready\n"))
    relay.signal()
    assert relay.wait_exit() == 0
