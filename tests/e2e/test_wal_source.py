"""The WAL source against a private PostgreSQL cluster with ``wal_level = logical``.

The machine's shared PostgreSQL has ``wal_level = replica``; the module makes a cluster of its
own (as the fleet test does, ``bench/parts/pgcluster.py``) and removes it. The source runs in
process here (what it hands the hub, exactly), and as the real ``pgws-relay`` command.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import psycopg.sql
import pytest
import trio
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from bench.parts.pgcluster import Cluster
from relay.app import connect_options
from relay.sources.base import SourceMisconfigured
from relay.sources.wal import WalSource
from relay.wire import positions
from tests.e2e.test_admin import admin_port, get, samples
from tests.helpers import (
    DB_URI,
    RELAY,
    RelayProcess,
    eventually,
    relay_env,
    run_to_exit,
    token,
    unique_channel,
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A private cluster with ``wal_level = logical`` (root makes it: CI must, so there a
    missing privilege fails the module; elsewhere it is skipped)."""
    if os.geteuid() != 0:
        message = "a private PostgreSQL cluster needs root"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    with Cluster(port=_free_port(), settings={"wal_level": "logical",
                                              "max_replication_slots": "20",
                                              "max_wal_senders": "20"}) as made:
        yield made


@pytest.fixture(scope="module")
def logical(cluster: Cluster) -> str:
    """Its URI."""
    return cluster.uri()


def _emit(uri: str, *statements: str) -> None:
    with psycopg.connect(uri, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]


class Reader:
    """A WAL source in process, and what it handed over."""

    def __init__(self, uri: str, prefix: str, slot: str, **options: Any) -> None:
        self.batches: list[list[bytes]] = []
        self._changed = trio.Event()  # Set at every batch: what until() waits on.
        self.listening = 0
        self.losses = 0
        self.source = WalSource(
            uri, connect_options(uri), prefix, slot, "pgws_relay",
            options.pop("max_payload_bytes", 1_000_000), self._publish,
            options.pop("heartbeat_interval", 0.5), options.pop("retries", 5),
            on_listening=self._listening, on_loss=self._loss)

    def _publish(self, payloads: list[bytes], arrived: float,
                 places: list[tuple[int, int]] | None = None) -> None:
        self.batches.append(list(payloads))
        self._changed.set()

    def _listening(self) -> None:
        self.listening += 1

    def _loss(self) -> None:
        self.losses += 1

    @property
    def received(self) -> list[bytes]:
        return [payload for batch in self.batches for payload in batch]

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait for ``condition``, woken by every batch (and at least once a second, for what
        no batch announces: a status the slot was told)."""
        with trio.fail_after(30):
            while True:
                self._changed = trio.Event()  # Before the check: no batch slips between.
                if condition():
                    return
                with trio.move_on_after(1.0):
                    await self._changed.wait()


def _slot() -> str:
    return unique_channel("slot").lower()


async def test_committed_messages_come_in_commit_order_and_rolled_back_ones_never(
        logical: str) -> None:
    prefix = unique_channel("wal")
    reader = Reader(logical, prefix, _slot())
    big = "x" * 100 * 1024
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader.source.run)
        await reader.source.ready.wait()
        with psycopg.connect(logical, autocommit=True) as conn:
            emit = "SELECT pg_logical_emit_message(%s, %s, %s)"
            conn.execute(emit, (True, prefix, "one"))
            conn.execute(emit, (True, prefix + "x", "another prefix"))
            conn.execute(emit, (False, prefix, "not transactional"))
            with conn.transaction():
                conn.execute(emit, (True, prefix, "two"))
                conn.execute(emit, (True, prefix, "three"))
            with pytest.raises(ZeroDivisionError), conn.transaction():
                conn.execute(emit, (True, prefix, "rolled back"))
                raise ZeroDivisionError
            conn.execute(emit, (True, prefix, big))
            conn.execute(emit, (True, prefix, "last"))
        await reader.until(lambda: reader.received[-1:] == [b"last"])
        nursery.cancel_scope.cancel()
    assert reader.received == [b"one", b"two", b"three", big.encode(), b"last"]
    # A transaction's messages are handed over together, in one batch.
    assert any(batch[i:i + 2] == [b"two", b"three"]
               for batch in reader.batches for i in range(len(batch)))
    assert reader.listening == 1 and reader.source.gaps == 0 and reader.losses == 0


async def test_a_terminated_walsender_loses_nothing_and_repeats_nothing(logical: str) -> None:
    prefix = unique_channel("wal")
    reader = Reader(logical, prefix, _slot())
    sent: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader.source.run)
        await reader.source.ready.wait()
        with psycopg.connect(logical, autocommit=True) as conn:
            for round_ in range(5):
                for n in range(20):
                    payload = f"{round_}-{n}"
                    conn.execute("SELECT pg_logical_emit_message(true, %s, %s)",
                                 (prefix, payload))
                    sent.append(payload.encode())
                await reader.until(lambda: len(reader.received) >= len(sent) // 2)
                conn.execute("SELECT pg_terminate_backend(active_pid) FROM "
                             "pg_replication_slots WHERE slot_name = %s",
                             (reader.source._slot,))
        await reader.until(lambda: len(reader.received) >= len(sent))
        nursery.cancel_scope.cancel()
    assert reader.received == sent
    assert reader.listening == 1 and reader.source.gaps == 0


async def test_a_reader_started_again_goes_on_from_its_slot(logical: str) -> None:
    prefix, slot = unique_channel("wal"), _slot()
    first = Reader(logical, prefix, slot)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(first.source.run)
        await first.source.ready.wait()
        _emit(logical, f"SELECT pg_logical_emit_message(true, '{prefix}', 'before')")
        await first.until(lambda: first.received == [b"before"])
        # What was delivered is confirmed within a status interval.
        await first.until(lambda: first.source.confirmed >= first.source.delivered > 0)
        nursery.cancel_scope.cancel()
    _emit(logical, f"SELECT pg_logical_emit_message(true, '{prefix}', 'while away')")
    second = Reader(logical, prefix, slot)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(second.source.run)
        _emit(logical, f"SELECT pg_logical_emit_message(true, '{prefix}', 'after')")
        await second.until(lambda: second.received[-1:] == [b"after"])
        nursery.cancel_scope.cancel()
    assert second.received == [b"while away", b"after"]
    assert second.source.gaps == 0


async def test_a_message_over_the_payload_bound_is_counted_and_reported(logical: str) -> None:
    prefix = unique_channel("wal")
    reader = Reader(logical, prefix, _slot(), max_payload_bytes=100)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader.source.run)
        await reader.source.ready.wait()
        _emit(logical, f"SELECT pg_logical_emit_message(true, '{prefix}', repeat('x', 101))",
              f"SELECT pg_logical_emit_message(true, '{prefix}', repeat('y', 100))")
        await reader.until(lambda: bool(reader.received))
        nursery.cancel_scope.cancel()
    assert reader.received == [b"y" * 100]
    assert reader.source.oversized == 1 and reader.losses == 1


async def test_a_slot_of_another_plugin_is_a_start_up_error_naming_the_setting(
        logical: str) -> None:
    slot = _slot()
    _emit(logical, f"SELECT pg_create_logical_replication_slot('{slot}', 'test_decoding')")
    reader = Reader(logical, unique_channel("wal"), slot)
    with pytest.raises(SourceMisconfigured, match=f"PGWS_WAL_SLOT: slot '{slot}' exists as a "
                                                   "logical slot of test_decoding"):
        await reader.source.run()
    _emit(logical, f"SELECT pg_drop_replication_slot('{slot}')")


def test_wal_level_replica_is_a_start_up_error_that_names_it() -> None:
    with psycopg.connect(DB_URI) as conn:
        level = conn.execute("SHOW wal_level").fetchone()[0]  # type: ignore[index]
    if level == "logical":
        pytest.skip("the shared PostgreSQL already has wal_level = logical")
    code, out, err = run_to_exit(relay_env(PGWS_SOURCE="wal", PGWS_WAL_SLOT="never_made"))
    assert code == 2
    lines = [line for line in (out + err).splitlines() if "wal_level" in line]
    assert len(lines) == 1 and "needs wal_level = logical" in lines[0] and level in lines[0]
    assert "Traceback" not in out + err


def test_the_relay_delivers_the_log_and_writes_through_it_then_its_slot_is_dropped(
        logical: str) -> None:
    listen, slot = unique_channel("wal"), _slot()
    env = relay_env(PGWS_DB_URI=logical, PGWS_SOURCE="wal", PGWS_WAL_SLOT=slot,
                    PGWS_LISTEN_CHANNEL=listen, PGWS_ADMIN_PORT="0")
    relay = RelayProcess(env)
    try:
        relay.wait_ready()
        port = admin_port(relay)
        assert eventually(lambda: get(port, "/ready")[:2] == (200, "ready\n"))
        url = relay.url(f"/chat/{token({'mode': 'rw', 'channel': 'chat'})}")
        with connect(url) as client, psycopg.connect(logical, autocommit=True) as listener:
            listener.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(listen)))
            big = json.dumps({"channel": "chat", "text": "z" * 20_000})
            with psycopg.connect(logical, autocommit=True) as producer:
                emit = "SELECT pg_logical_emit_message(true, %s, %s)"
                producer.execute(emit, (listen, '{"channel":"chat","n":1}'))
                producer.execute(emit, (listen, big))  # Over NOTIFY's 8,000 bytes.
            assert json.loads(client.recv(timeout=10)) == {"channel": "chat", "n": 1}
            assert client.recv(timeout=10) == big
            client.send("hello")  # Back through the log; NOTIFY for database listeners too.
            echo = json.loads(client.recv(timeout=10))
            assert (echo["payload"], echo["channel"]) == ("hello", "chat")
            notified = next(listener.notifies(timeout=10, stop_after=1))
            assert json.loads(notified.payload) == echo
        # The slot is told every second; it confirms no more than was delivered.
        read = eventually(lambda: (found := samples(port))[("pgws_wal_confirmed_lsn", ())] > 0
                          and found)
        assert read[("pgws_wal_delivered_lsn", ())] >= read[("pgws_wal_confirmed_lsn", ())]
        assert read[("pgws_wal_lag_bytes", ())] >= 0
        assert 0 <= read[("pgws_wal_seconds_since_message", ())] < 3600
        assert read[("pgws_notifications_received_total", ())] == 3
    finally:
        relay.stop()
    assert eventually(lambda: _slot_inactive(logical, slot))
    code, out, _ = _drop_slot(env)
    assert (code, out.strip()) == (0, f"dropped replication slot {slot!r}")
    code, _, err = _drop_slot(env)
    assert code == 1 and f"there is no replication slot {slot!r}" in err


def _slot_inactive(uri: str, slot: str) -> bool:
    with psycopg.connect(uri) as conn:
        row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                           (slot,)).fetchone()
    return row is not None and not row[0]


def _drop_slot(env: dict[str, str]) -> tuple[int, str, str]:
    done = subprocess.run([RELAY, "drop-slot"], env=env, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.fault
async def test_a_fast_shutdown_of_postgresql_is_not_held_and_reading_goes_on_after_it(
        cluster: Cluster) -> None:
    """The walsender stops only once its client confirmed everything it sent (the shutdown
    checkpoint included): a reader that confirmed only what it delivered would hold
    ``pg_ctl restart -m fast`` until it fails."""
    uri, prefix = cluster.uri(), unique_channel("wal")
    reader = Reader(uri, prefix, _slot(), retries=10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader.source.run)
        await reader.source.ready.wait()
        _emit(uri, f"SELECT pg_logical_emit_message(true, '{prefix}', 'before')")
        await reader.until(lambda: reader.received == [b"before"])
        # WAL that holds no message: the walsender sends nothing for it, yet must see it
        # confirmed before it may stop.
        _emit(uri, "CREATE TABLE IF NOT EXISTS filler (n int)", "INSERT INTO filler VALUES (1)")
        await trio.to_thread.run_sync(cluster.restart, "fast", 20.0)
        await reader.until(lambda: reader.source.status is None)
        _emit(uri, f"SELECT pg_logical_emit_message(true, '{prefix}', 'after')")
        await reader.until(lambda: reader.received[-1:] == [b"after"])
        nursery.cancel_scope.cancel()
    assert reader.received == [b"before", b"after"]
    assert reader.source.gaps == 0 and reader.listening == 1


SUB = [positions.SUBPROTOCOL]


def _wal_relay(uri: str, slot: str, listen: str, **overrides: str) -> RelayProcess:
    relay = RelayProcess(relay_env(PGWS_DB_URI=uri, PGWS_SOURCE="wal", PGWS_WAL_SLOT=slot,
                                   PGWS_LISTEN_CHANNEL=listen, **overrides))
    relay.wait_ready()
    return relay


def _resume(relay: RelayProcess, position: str | None) -> Any:
    query = f"?from={position}" if position is not None else ""
    return connect(relay.url(f"/c{query}"), subprotocols=SUB,  # type: ignore[arg-type]
                   additional_headers={"Authorization": f"Bearer {token({'mode': 'r'})}"},
                   open_timeout=10)


def _first(client: Any) -> positions.Delivery | positions.Control:
    """The next message, whatever it is (the first after connecting is an event)."""
    return positions.read(client.recv(timeout=20))


def _next(client: Any) -> positions.Delivery | positions.Control:
    """The next delivery or event, past the checkpoints' position events (every 5 s while the
    stream moves, whenever the clock says)."""
    while True:
        message = _first(client)
        if not (isinstance(message, positions.Control) and message.event == "position"):
            return message


def _emit_n(uri: str, listen: str, numbers: range) -> None:
    with psycopg.connect(uri, autocommit=True) as conn:
        for n in numbers:
            conn.execute("SELECT pg_logical_emit_message(true, %s, %s)",
                         (listen, json.dumps({"channel": "c", "n": n})))


def _lsn(uri: str, query: str) -> int:
    with psycopg.connect(uri) as conn:
        text = conn.execute(query).fetchone()[0]  # type: ignore[index,arg-type]
    high, low = str(text).split("/")
    return int(high, 16) << 32 | int(low, 16)


def _n(event: positions.Delivery | positions.Control) -> int:
    assert isinstance(event, positions.Delivery), event
    return int(json.loads(event.payload)["n"])


@pytest.mark.fault
def test_a_position_resumes_after_the_relay_was_killed_and_on_another_relay(
        logical: str) -> None:
    listen, first_slot, second_slot = unique_channel("wal"), _slot(), _slot()
    relay = _wal_relay(logical, first_slot, listen)
    other: RelayProcess | None = None
    try:
        with _resume(relay, None) as client:
            assert _first(client).event == "position"  # type: ignore[union-attr]
            before = _lsn(logical, "SELECT pg_current_wal_lsn()")
            _emit_n(logical, listen, range(1, 6))
            seen = [_next(client) for _ in range(5)]
        assert list(map(_n, seen)) == [1, 2, 3, 4, 5]
        position = seen[-1].position
        # The slot was told (once a second) about these deliveries: it keeps what the history
        # holds, so the relay can read it back.
        eventually(lambda: _lsn(logical, "SELECT confirmed_flush_lsn FROM pg_replication_slots "
                                         f"WHERE slot_name = '{first_slot}'") > before)
        relay.proc.kill()  # SIGKILL: no goodbye, the slot keeps what the history held.
        relay.wait_exit()
        _emit_n(logical, listen, range(6, 11))
        relay = _wal_relay(logical, first_slot, listen)
        with _resume(relay, position) as client:
            resumed = _next(client)
            assert (resumed.event, resumed.replayed) == ("resumed", 5)  # type: ignore[union-attr]
            again = [_next(client) for _ in range(5)]
            assert list(map(_n, again)) == [6, 7, 8, 9, 10]
            _emit_n(logical, listen, range(11, 12))
            assert _n(_next(client)) == 11
        # Another relay, with a slot of its own made after all this: the log is the same, so
        # a position of the first relay names the same point there (no digest to wait for).
        other = _wal_relay(logical, second_slot, listen)
        with _resume(other, again[2].position) as client:
            resumed = _next(client)
            assert resumed.event == "lost" and resumed.reason == positions.EXPIRED  # type: ignore[union-attr]
        _emit_n(logical, listen, range(12, 14))
        with _resume(relay, None) as watcher:
            assert _first(watcher).event == "position"  # type: ignore[union-attr]
            _emit_n(logical, listen, range(14, 15))
            latest = _next(watcher)
            while _n(latest) != 14:  # The watcher may have joined before 12 and 13 came.
                latest = _next(watcher)
        with _resume(other, latest.position) as client:  # Issued by the first relay.
            resumed = _next(client)
            assert (resumed.event, resumed.replayed) == ("resumed", 0)  # type: ignore[union-attr]
            _emit_n(logical, listen, range(15, 16))
            assert _n(_next(client)) == 15
    finally:
        relay.stop()
        if other is not None:
            other.stop()


def test_a_write_too_big_for_notify_goes_through_the_log_alone_and_an_oversized_one_is_told(
        logical: str) -> None:
    listen, slot = unique_channel("wal"), _slot()
    relay = _wal_relay(logical, slot, listen, PGWS_MAX_MESSAGE_SIZE="20000",
                       PGWS_MAX_PAYLOAD_BYTES="15000")
    try:
        url = relay.url(f"/c/{token({'mode': 'rw', 'channel': 'c'})}")
        with connect(url, subprotocols=SUB) as client, \
                psycopg.connect(logical, autocommit=True) as listener:  # type: ignore[arg-type]
            listener.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(listen)))
            assert _first(client).event == "position"  # type: ignore[union-attr]
            client.send("w" * 10_000)  # Its envelope is over NOTIFY's 8,000 bytes.
            echo = _next(client)
            assert isinstance(echo, positions.Delivery)
            assert json.loads(echo.payload)["payload"] == "w" * 10_000
            client.send("small")  # Through both: the first NOTIFY listeners get is this one.
            small = _next(client)
            notified = next(listener.notifies(timeout=10, stop_after=1))
            assert json.loads(notified.payload)["payload"] == "small"
            assert json.loads(small.payload)["payload"] == "small"  # type: ignore[union-attr]
            _emit(logical, f"SELECT pg_logical_emit_message(true, '{listen}', "
                           f"'{{\"channel\":\"c\",\"big\":\"' || repeat('b', 16000) || '\"}}')",
                  f"SELECT pg_logical_emit_message(true, '{listen}', '{{\"channel\":\"c\"}}')")
            told = _next(client)
            assert (told.event, told.reason) == ("lost", positions.GAP)  # type: ignore[union-attr]
            after = _next(client)
            assert isinstance(after, positions.Delivery) and after.payload == '{"channel":"c"}'
            client.send("x" * 15_000)  # Its envelope is over PGWS_MAX_PAYLOAD_BYTES.
            with pytest.raises(ConnectionClosed) as closed:
                client.recv(timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        relay.wait_for_line(r"over PGWS_MAX_PAYLOAD_BYTES \(15000\) not delivered")
    finally:
        relay.stop()


@pytest.mark.fault
async def test_transactions_read_as_the_walsender_dies_are_delivered_not_dropped(
        logical: str) -> None:
    """The stream may end in the middle of a read that already took whole transactions: they
    must reach the hub before the reconnection, which starts after them."""
    prefix = unique_channel("wal")
    reader = Reader(logical, prefix, _slot(), retries=20)
    sent: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader.source.run)
        await reader.source.ready.wait()

        def produce() -> None:
            with psycopg.connect(logical, autocommit=True) as conn:
                for batch in range(300):
                    with conn.transaction():
                        for n in range(10):
                            payload = f"{batch}-{n}"
                            conn.execute("SELECT pg_logical_emit_message(true, %s, %s)",
                                         (prefix, payload))
                            sent.append(payload.encode())

        def terminate() -> None:
            pace = threading.Event()  # Never set: its wait paces the fault, ~20 a second.
            with psycopg.connect(logical, autocommit=True) as conn:
                while len(sent) < 3000:
                    conn.execute("SELECT pg_terminate_backend(active_pid) FROM "
                                 "pg_replication_slots WHERE slot_name = %s AND active_pid "
                                 "IS NOT NULL", (reader.source._slot,))
                    pace.wait(0.05)

        async with trio.open_nursery() as load:
            load.start_soon(trio.to_thread.run_sync, produce)
            load.start_soon(trio.to_thread.run_sync, terminate)
        await reader.until(lambda: len(reader.received) >= len(sent))
        nursery.cancel_scope.cancel()
    assert reader.received == sent
    assert reader.source.gaps == 0 and reader.listening == 1
