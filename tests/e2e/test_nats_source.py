"""The feeder and the NATS source, with a private nats-server (JetStream) and a private
PostgreSQL cluster with ``wal_level = logical``, through the real ``pgws-relay`` commands."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from websockets.sync.client import connect

from bench.parts.pgcluster import Cluster
from relay.sources.nats import channel_of_subject, message_id, place_of_id, subject_for
from relay.wire import positions
from tests.e2e.test_wal_source import _first, _free_port, _n, _next
from tests.helpers import (
    RELAY,
    TIMEOUT,
    Lines,
    RelayProcess,
    eventually,
    relay_env,
    token,
    unique_channel,
)

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
SUB = [positions.SUBPROTOCOL]


@pytest.fixture(scope="module")
def logical() -> Iterator[str]:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("a private PostgreSQL cluster needs root")
        pytest.skip("a private PostgreSQL cluster needs root")
    with Cluster(port=_free_port(), settings={"wal_level": "logical",
                                              "max_replication_slots": "20",
                                              "max_wal_senders": "20"}) as cluster:
        yield cluster.uri()


def _start_nats(port: int, store: str) -> subprocess.Popen[str]:
    """A nats-server with JetStream on ``port``, keeping its streams in ``store``; ready."""
    server = subprocess.Popen([NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(port),
                               "-sd", store], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = Lines()
    lines.read_from(server.stdout)
    lines.wait_for(lambda: any("Server is ready" in line for line in lines.items), TIMEOUT,
                   "nats-server ready")
    return server


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    """A nats-server with JetStream of the module's own."""
    if not os.access(NATS_SERVER, os.X_OK):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{NATS_SERVER} not found (apt-get install nats-server)")
        pytest.skip(f"{NATS_SERVER} not found")
    port = _free_port()
    store = tempfile.mkdtemp(prefix="pgws-nats-")
    server = _start_nats(port, store)
    try:
        yield f"nats://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(TIMEOUT)
        shutil.rmtree(store, ignore_errors=True)


class Feeder:
    """``pgws-relay feed`` as a process."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([RELAY, "feed"], env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines = Lines()
        self.lines.read_from(self.proc.stdout)

    def wait_for(self, text: str) -> None:
        self.lines.wait_for(lambda: any(text in line for line in self.lines.items)
                            or self.proc.poll() is not None, TIMEOUT, text)
        assert any(text in line for line in self.lines.items), "\n".join(self.lines.items)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)


def _env(logical: str, nats_url: str, listen: str, stream: str, **more: str) -> dict[str, str]:
    return relay_env(PGWS_DB_URI=logical, PGWS_NATS_URL=nats_url, PGWS_NATS_STREAM=stream,
                     PGWS_LISTEN_CHANNEL=listen, **more)


def _emit(uri: str, listen: str, numbers: range) -> None:
    with psycopg.connect(uri, autocommit=True) as conn:
        for n in numbers:
            conn.execute("SELECT pg_logical_emit_message(true, %s, %s)",
                         (listen, json.dumps({"channel": "c", "n": n})))


def _stored(nats_url: str, stream: str) -> list[tuple[str, dict[str, Any], str]]:
    """Every message of the stream: (subject, payload, Nats-Msg-Id)."""
    async def read() -> list[tuple[str, dict[str, Any], str]]:
        import nats

        connection = await nats.connect(nats_url)
        try:
            js = connection.jetstream()
            info = await js.stream_info(stream)
            if not info.state.last_seq:
                return []
            found = []
            for sequence in range(info.state.first_seq, info.state.last_seq + 1):
                message = await js.get_msg(stream, sequence)
                found.append((message.subject, json.loads(message.data),
                              (message.headers or {})["Nats-Msg-Id"]))
            return found
        finally:
            await connection.close()

    return asyncio.run(read())


def _resume(relay: RelayProcess, position: str | None) -> Any:
    query = f"?from={position}" if position is not None else ""
    return connect(relay.url(f"/c{query}"), subprotocols=SUB,  # type: ignore[arg-type]
                   additional_headers={"Authorization": f"Bearer {token({'mode': 'rw'})}"},
                   open_timeout=10)


def _numbers(client: Any, count: int) -> list[int]:
    """The next ``count`` deliveries' numbers."""
    return [_n(_next(client)) for _ in range(count)]


def test_channel_names_are_one_subject_token_each_and_come_back() -> None:
    for channel in ("fill_event", "a.b", "*", ">", "with space", "100%", "é", "", "%", "-_"):
        subject = subject_for("pgws", channel)
        token_ = subject.removeprefix("pgws.")
        assert token_ and not any(c in token_ for c in ".*> \t") and token_.isascii()
        assert channel_of_subject("pgws", subject) == channel
    assert subject_for("pgws", "fill_event") == "pgws.fill_event"
    assert subject_for("s", "a.b") == "s.a%2Eb"
    long = subject_for("s", "é" * 400)  # 2,400 characters as %XX: over NATS's control line.
    assert long.startswith("s.%%") and len(long) < 40 and long != subject_for("s", "é" * 401)
    with pytest.raises(ValueError):
        channel_of_subject("s", long)


def test_message_ids_name_the_database_the_prefix_and_the_place() -> None:
    one = message_id("7304", "postgres", "listen", 0x16B374D848, 3)
    assert place_of_id(one) == (one.rsplit(".", 2)[0], 0x16B374D848 << 32 | 3)
    assert message_id("7305", "postgres", "listen", 1, 0) != message_id("7304", "postgres",
                                                                         "listen", 1, 0)
    assert message_id("7304", "postgres", "other", 1, 0).rsplit(".", 2)[0] != \
        one.rsplit(".", 2)[0]
    assert place_of_id("not an id") is None and place_of_id("a.b.zz.1") is None


@pytest.mark.fault
def test_the_feeder_stores_each_message_once_across_kills_and_relays_resume_from_the_stream(
        logical: str, nats_url: str) -> None:
    listen, stream, slot = unique_channel("nats"), unique_channel("s"), unique_channel("slot")
    stream, slot = stream.replace("-", "_"), slot.lower()
    env = _env(logical, nats_url, listen, stream, PGWS_WAL_SLOT=slot)
    feeder = Feeder(env)
    relays: list[RelayProcess] = []
    try:
        feeder.wait_for("through the write-ahead log")
        _emit(logical, listen, range(1, 51))
        feeder.proc.kill()  # Whatever it had published and not confirmed is read again.
        feeder.proc.wait(TIMEOUT)
        _emit(logical, listen, range(51, 101))
        feeder = Feeder(env)
        feeder.wait_for("through the write-ahead log")
        relay = RelayProcess(_env(logical, nats_url, listen, stream, PGWS_SOURCE="nats"))
        relays.append(relay)
        relay.wait_ready()
        with _resume(relay, None) as client:
            assert _first(client).event == "position"  # type: ignore[union-attr]
            _emit(logical, listen, range(101, 106))
            seen = [_next(client) for _ in range(5)]
            assert list(map(_n, seen)) == [101, 102, 103, 104, 105]
            client.send("hello")  # To the database's log, back through the feeder.
            echo = _next(client)
            assert isinstance(echo, positions.Delivery)
            assert json.loads(echo.payload)["payload"] == "hello"
        position = seen[1].position
        relay.proc.send_signal(signal.SIGKILL)
        relay.wait_exit()
        other = RelayProcess(_env(logical, nats_url, listen, stream, PGWS_SOURCE="nats"))
        relays.append(other)
        other.wait_ready()
        with _resume(other, position) as client:  # Issued by the relay that was killed.
            resumed = _next(client)
            assert (resumed.event, resumed.replayed) == ("resumed", 4)  # type: ignore[union-attr]
            replayed = [_next(client) for _ in range(4)]
            assert [json.loads(event.payload).get("n") for event in replayed  # type: ignore[union-attr]
                    ] == [103, 104, 105, None]  # And the echo of "hello".
        stored = _stored(nats_url, stream)
        numbers = [payload.get("n") for _, payload, _ in stored if "n" in payload]
        assert numbers == list(range(1, 106))  # Each once, in the log's order.
        ids = [ident for _, _, ident in stored]
        assert len(set(ids)) == len(ids)
        assert {subject for subject, _, _ in stored} == {f"{stream}.c"}
    finally:
        feeder.stop()
        for relay in relays:
            relay.stop()


@pytest.mark.fault
def test_a_standby_feeder_takes_over_from_one_killed_and_nothing_is_lost_or_stored_twice(
        logical: str, nats_url: str) -> None:
    listen, stream, slot = unique_channel("nats"), unique_channel("s"), unique_channel("slot")
    stream, slot = stream.replace("-", "_"), slot.lower()
    env = _env(logical, nats_url, listen, stream, PGWS_WAL_SLOT=slot)
    active = Feeder(env)
    standby: Feeder | None = None
    try:
        active.wait_for("through the write-ahead log")
        standby = Feeder(env)
        standby.wait_for("standing by to take over")
        _emit(logical, listen, range(1, 201))
        active.proc.kill()
        active.proc.wait(TIMEOUT)
        _emit(logical, listen, range(201, 401))
        standby.wait_for("through the write-ahead log")
        _emit(logical, listen, range(401, 402))

        def complete() -> bool:
            numbers = [payload["n"] for _, payload, _ in _stored(nats_url, stream)]
            return numbers[-1:] == [401]

        eventually(complete, what="the stream holds every message")
        numbers = [payload["n"] for _, payload, _ in _stored(nats_url, stream)]
        assert numbers == list(range(1, 402))
    finally:
        active.stop()
        if standby is not None:
            standby.stop()


@pytest.mark.fault
def test_a_nats_server_restarted_under_a_relay_loses_nothing(logical: str) -> None:
    port, store = _free_port(), tempfile.mkdtemp(prefix="pgws-nats-")
    url = f"nats://127.0.0.1:{port}"

    listen, stream, slot = unique_channel("nats"), "restart", unique_channel("slot").lower()
    nats_server = _start_nats(port, store)
    feeder: Feeder | None = None
    relay: RelayProcess | None = None
    try:
        feeder = Feeder(_env(logical, url, listen, stream, PGWS_WAL_SLOT=slot))
        feeder.wait_for("through the write-ahead log")
        relay = RelayProcess(_env(logical, url, listen, stream, PGWS_SOURCE="nats"))
        relay.wait_ready()
        with _resume(relay, None) as client:
            assert _first(client).event == "position"  # type: ignore[union-attr]
            _emit(logical, listen, range(1, 11))
            assert _numbers(client, 10) == list(range(1, 11))
            nats_server.kill()
            nats_server.wait(TIMEOUT)
            _emit(logical, listen, range(11, 21))  # Into the log while NATS is away.
            nats_server = _start_nats(port, store)
            assert _numbers(client, 10) == list(range(11, 21))
    finally:
        for process in (feeder, relay):
            if process is not None:
                process.stop()
        nats_server.kill()
        nats_server.wait(TIMEOUT)
        shutil.rmtree(store, ignore_errors=True)


@pytest.mark.fault
def test_what_nats_has_not_stored_is_not_confirmed_and_survives_the_feeders_kill(
        logical: str) -> None:
    port, store = _free_port(), tempfile.mkdtemp(prefix="pgws-nats-")
    url = f"nats://127.0.0.1:{port}"

    listen, stream, slot = unique_channel("nats"), "unstored", unique_channel("slot").lower()
    env = _env(logical, url, listen, stream, PGWS_WAL_SLOT=slot)
    nats_server = _start_nats(port, store)
    feeder = Feeder(env)
    try:
        feeder.wait_for("through the write-ahead log")
        nats_server.kill()
        nats_server.wait(TIMEOUT)
        _emit(logical, listen, range(1, 21))  # Read by the feeder, not storable.
        with psycopg.connect(logical, autocommit=True) as conn:
            committed = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]

            def told_since() -> bool:  # The feeder sent a status well after it read them.
                row = conn.execute("SELECT reply_time FROM pg_stat_replication "
                                   "WHERE application_name = 'pgws-relay'").fetchone()
                return row is not None and row[0] is not None and \
                    (row[0] - committed).total_seconds() > 1.5

            eventually(told_since, what="a status from the feeder")
        feeder.proc.kill()
        feeder.proc.wait(TIMEOUT)
        nats_server = _start_nats(port, store)
        feeder = Feeder(env)
        eventually(lambda: [p["n"] for _, p, _ in _stored(url, stream)][-1:] == [20],
                   what="every message stored")
        assert [payload["n"] for _, payload, _ in _stored(url, stream)] == list(range(1, 21))
    finally:
        feeder.stop()
        nats_server.kill()
        nats_server.wait(TIMEOUT)
        shutil.rmtree(store, ignore_errors=True)


@contextlib.contextmanager
def _fed_relay(logical: str, nats_url: str, **settings: str
               ) -> Iterator[tuple[str, RelayProcess]]:
    """A feeder on a stream of its own and a relay reading it (with ``settings``): the listen
    channel and the relay; both stopped afterwards."""
    listen, stream, slot = unique_channel("nats"), unique_channel("s"), unique_channel("slot")
    stream, slot = stream.replace("-", "_"), slot.lower()
    feeder = Feeder(_env(logical, nats_url, listen, stream, PGWS_WAL_SLOT=slot))
    relay: RelayProcess | None = None
    try:
        feeder.wait_for("through the write-ahead log")
        relay = RelayProcess(_env(logical, nats_url, listen, stream, PGWS_SOURCE="nats",
                                  **settings))
        relay.wait_ready()
        yield listen, relay
    finally:
        feeder.stop()
        if relay is not None:
            relay.stop()


@pytest.mark.slow
def test_a_resume_older_than_the_relays_history_is_read_again_from_the_stream(
        logical: str, nats_url: str) -> None:
    with _fed_relay(logical, nats_url, PGWS_HISTORY_MESSAGES="5") as (listen, relay):
        with _resume(relay, None) as client:
            assert _first(client).event == "position"  # type: ignore[union-attr]
            _emit(logical, listen, range(1, 3))
            position = [_next(client) for _ in range(2)][-1].position
        _emit(logical, listen, range(3, 21))  # The relay keeps 16 to 20 of these.
        with _resume(relay, None) as watcher:
            assert _first(watcher).event == "position"  # type: ignore[union-attr]
            _emit(logical, listen, range(21, 22))
            while _n(_next(watcher)) != 21:
                pass
        with _resume(relay, position) as client:
            resumed = _next(client)
            assert (resumed.event, resumed.replayed) == ("resumed", 19)  # type: ignore[union-attr]
            replayed = [_next(client) for _ in range(19)]
            assert [_n(event) for event in replayed] == list(range(3, 22))
            _emit(logical, listen, range(22, 23))
            assert _numbers(client, 1) == [22]
        # A position given with a message read back from the stream resumes after it.
        with _resume(relay, replayed[2].position) as client:  # type: ignore[union-attr]
            assert _next(client).event == "resumed"  # type: ignore[union-attr]
            assert _numbers(client, 17) == list(range(6, 23))


@pytest.mark.fault
def test_a_resume_read_again_while_nats_answers_nothing_waits_for_it_and_loses_nothing(
        logical: str) -> None:
    """NATS stopped (SIGSTOP: connections open, nothing answered) while a client resumes from
    before the relay's history: the read is tried again, not answered ``lost``, and once NATS
    answers again the client gets every message once."""
    port, store = _free_port(), tempfile.mkdtemp(prefix="pgws-nats-")
    nats_server = _start_nats(port, store)
    try:
        with _fed_relay(logical, f"nats://127.0.0.1:{port}", PGWS_HISTORY_MESSAGES="5") as (
                listen, relay):
            with _resume(relay, None) as client:
                assert _first(client).event == "position"  # type: ignore[union-attr]
                _emit(logical, listen, range(1, 21))
                position = _numbers_and_last_position(client, 20)
            nats_server.send_signal(signal.SIGSTOP)
            try:
                start = len(relay.lines)
                with _resume(relay, position) as client:
                    relay.wait_for_line("reading the stream again for a resume failed: .*; "
                                        "retrying", start=start)
                    nats_server.send_signal(signal.SIGCONT)
                    resumed = _next(client)
                    assert resumed.event == "resumed"  # type: ignore[union-attr]
                    assert _numbers(client, 18) == list(range(3, 21))
            finally:
                nats_server.send_signal(signal.SIGCONT)
    finally:
        nats_server.kill()
        nats_server.wait(TIMEOUT)
        shutil.rmtree(store, ignore_errors=True)


def _numbers_and_last_position(client: Any, count: int) -> str:
    """Read ``count`` deliveries; the position of the second (what a client that read only two
    of them would resume from)."""
    events = [_next(client) for _ in range(count)]
    assert [_n(event) for event in events] == list(range(1, count + 1))
    return events[1].position  # type: ignore[union-attr]


@pytest.mark.slow
def test_a_resume_from_before_a_purged_stream_is_told_expired_not_asked_to_come_back(
        logical: str, nats_url: str) -> None:
    with _fed_relay(logical, nats_url, PGWS_HISTORY_MESSAGES="5") as (listen, relay):
        with _resume(relay, None) as client:
            assert _first(client).event == "position"  # type: ignore[union-attr]
            _emit(logical, listen, range(1, 21))
            position = _numbers_and_last_position(client, 20)
        stream = relay.env["PGWS_NATS_STREAM"]

        async def purge() -> None:
            import nats

            connection = await nats.connect(nats_url)
            try:
                await connection.jetstream().purge_stream(stream)
            finally:
                await connection.close()

        asyncio.run(purge())  # The stream holds nothing now; the relay still holds 16 to 20.
        with _resume(relay, position) as client:
            lost = _next(client)
            assert (lost.event, lost.reason) == ("lost", positions.EXPIRED)  # type: ignore[union-attr]
            _emit(logical, listen, range(21, 22))  # And it is live from there.
            assert _numbers(client, 1) == [21]


@pytest.mark.slow
def test_a_resume_larger_than_the_clients_queue_is_read_again_in_steps_and_loses_nothing(
        logical: str, nats_url: str) -> None:
    # Half a 4 KiB queue holds about 18 of these deliveries: 300 take many steps.
    with _fed_relay(logical, nats_url, PGWS_HISTORY_MESSAGES="5", PGWS_MAX_QUEUE_BYTES="4096",
                    PGWS_MAX_PAYLOAD_BYTES="1000",
                    PGWS_SEND_BUFFER="4096") as (listen, relay):
        with _resume(relay, None) as client:
            position = _first(client).position  # type: ignore[union-attr]
        _emit(logical, listen, range(1, 301))
        with _resume(relay, None) as watcher:
            assert _first(watcher).event == "position"  # type: ignore[union-attr]
            _emit(logical, listen, range(301, 302))
            while _n(_next(watcher)) != 301:
                pass
        with _resume(relay, position) as client:
            resumed = _next(client)
            # Not all in one step: the count is not known when the first is sent.
            assert (resumed.event, resumed.replayed) == ("resumed", None)  # type: ignore[union-attr]
            assert _numbers(client, 301) == list(range(1, 302))
            _emit(logical, listen, range(302, 303))
            assert _numbers(client, 1) == [302]
