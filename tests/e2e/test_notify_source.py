"""The listener in process, against the real PostgreSQL (upstream HasqlBroadcastSpec and more)."""

from __future__ import annotations

from typing import Any

import trio

from relay.app import connect_options
from relay.core.hub import Hub
from relay.sources.base import SourceGaveUp
from relay.sources.notifier import Notifier
from relay.sources.notify import NotifySource
from relay.sources.outage import backoff, retry_window
from relay.wire.frames import TEXT_FRAMES
from tests.helpers import DB_URI, notify, unique_channel
from tests.unit.core.test_hub import Recorder


class Signalling(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.arrived = trio.Event()

    def offer(self, frame: bytes) -> None:
        super().offer(frame)
        self.arrived.set()


def _listener(listen: str, hub: Hub, notifier: Notifier, **kwargs: object) -> NotifySource:
    options = {"heartbeat_interval": 0.2, "retries": 1, **kwargs}
    return NotifySource(DB_URI, connect_options(DB_URI), listen, hub.publish, notifier,
                    options["heartbeat_interval"], options["retries"])  # type: ignore[arg-type]


async def test_relays_messages_sent_to_the_database_channel() -> None:
    listen = unique_channel("postgres-websockets")
    hub = Hub(listen, encoding=TEXT_FRAMES)
    subscriber = Signalling()
    hub.add(subscriber, ["test"])
    notifier = Notifier(DB_URI, 2, connect_options(DB_URI))
    listener = _listener(listen, hub, notifier)
    payload = '{"channel": "test", "payload": "hello there"}'
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listener.run)
            await listener.ready.wait()
            await trio.to_thread.run_sync(notify, listen, payload)
            await subscriber.arrived.wait()
            nursery.cancel_scope.cancel()
    assert subscriber.messages() == [payload]
    await notifier.aclose()


class CountingNotifier(Notifier):
    """The real notifier, telling the test when it has sent enough NOTIFYs."""

    def __init__(self, enough: int) -> None:
        super().__init__(DB_URI, 2, connect_options(DB_URI))
        self.sent = 0
        self.enough = enough
        self.done = trio.Event()

    async def notify(self, channel: str, payload: str, on_sent: Any = None) -> None:
        await super().notify(channel, payload, on_sent)
        self.sent += 1
        if self.sent >= self.enough:
            self.done.set()


async def test_heartbeats_keep_a_healthy_listener_connected() -> None:
    listen = unique_channel()
    hub = Hub(listen, encoding=TEXT_FRAMES)
    # 30 heartbeats at 0.05 s outlast the 1 s heartbeat timeout: one that did not come back
    # would have been declared a lost connection.
    notifier = CountingNotifier(enough=30)
    listener = _listener(listen, hub, notifier, heartbeat_interval=0.05)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listener.run)
            await listener.ready.wait()
            await notifier.done.wait()
            nursery.cancel_scope.cancel()
    assert listener.gaps == 0
    assert listener._heartbeat_seen >= 20
    await notifier.aclose()


async def test_gives_up_after_the_retries() -> None:
    dead = "postgresql://postgres@127.0.0.1:1/postgres"
    notifier = Notifier(dead, 1, connect_options(dead))
    hub = Hub("x", encoding=TEXT_FRAMES)
    listener = NotifySource(dead, connect_options(dead), "x", hub.publish, notifier, 0, 1)
    with trio.fail_after(15):
        try:
            await listener.run()
        except SourceGaveUp as exc:
            assert "(1 attempts)" in str(exc)
        else:
            raise AssertionError("the listener did not give up")


def test_backoff_doubles_and_caps() -> None:
    assert [backoff(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 32, 32]


def test_an_outage_may_last_as_long_as_upstreams_attempts_span() -> None:
    # Upstream makes N attempts with backoff 1, 2, 4 … between them; 0 and 1 mean one attempt.
    assert [retry_window(n) for n in (0, 1, 2, 3, 5, 7)] == [0, 0, 1, 3, 15, 63]


async def test_a_backlog_longer_than_the_heartbeat_timeout_is_not_a_lost_connection() -> None:
    """A relay whose fan-out is slower than the notifications arriving drains a backlog, and
    its heartbeat waits behind it; that is a busy connection, not a dead one. Declaring it lost
    would drop every notification still queued on it (bench/scenarios/filters.py found this at
    10,000
    clients)."""
    listen = unique_channel()
    received: list[bytes] = []
    total = 3000
    finished = trio.Event()  # Every notification arrived, or the connection was replaced.

    def slow_publish(payloads, arrived) -> None:
        import time

        received.extend(payloads)
        time.sleep(0.001 * len(payloads))  # 1 ms of fan-out per notification: 3 s in all.
        if len(received) >= total:
            finished.set()

    notifier = Notifier(DB_URI, 2, connect_options(DB_URI))
    # Heartbeats every 0.2 s, each due back within the 1 s minimum: the backlog lasts 3 s.
    listener = NotifySource(DB_URI, connect_options(DB_URI), listen, slow_publish, notifier, 0.2, 1,
                        on_gap=lambda since, until: finished.set())
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listener.run)
            await listener.ready.wait()
            payloads = [f'{{"channel":"c","n":{n}}}' for n in range(total)]
            await trio.to_thread.run_sync(lambda: notify(listen, *payloads))
            await finished.wait()
            nursery.cancel_scope.cancel()
    assert listener.gaps == 0
    assert len(received) == total
    await notifier.aclose()
