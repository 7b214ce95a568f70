"""The client library (relay/client/subscription.py) against the real relay.

Connections are cut, frozen and refused for real: by killing and restarting the relay, by a
TCP proxy in this process that the test can cut or stop forwarding, by tokens that expire.
"""

from __future__ import annotations

import json
import logging
import random
import re
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
import pytest
import trio

from relay.client.subscription import (
    UNSUPPORTED,
    Closed,
    Endpoint,
    Lost,
    Message,
    Refused,
    backoff,
    subscribe,
)
from relay.wire.positions import Position, parse_position
from tests.helpers import DB_URI, SEALER, RelayProcess, notify, token, unique_channel

#: Reconnect quickly: these tests cut connections on purpose.
FAST: dict[str, Any] = {"backoff_min": 0.05, "backoff_max": 0.2}


def reader(channel: str, **claims: object) -> str:
    return token({"mode": "r", "channel": channel, **claims})


def payload(channel: str, n: object) -> str:
    return json.dumps({"channel": channel, "payload": n})


def number(message: object) -> object:
    assert isinstance(message, Message), message
    return json.loads(message.payload)["payload"]


async def send(relay: RelayProcess, channel: str, *numbers: object) -> None:
    """NOTIFY ``numbers`` on ``channel``, in one transaction."""
    await trio.to_thread.run_sync(
        notify, relay.env["PGWS_LISTEN_CHANNEL"], *(payload(channel, n) for n in numbers))


async def start(start_relay: Callable[..., RelayProcess], **overrides: str) -> RelayProcess:
    return await trio.to_thread.run_sync(lambda: start_relay(**overrides))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Proxy:
    """A TCP proxy to a relay port: :meth:`cut` closes every connection through it,
    :meth:`freeze` stops forwarding on them (a peer gone silent); new connections go through."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._links: list[tuple[trio.CancelScope, list[bool]]] = []

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._link, listeners)

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def cut(self) -> None:
        for scope, _ in self._links:
            scope.cancel()

    def freeze(self) -> None:
        for _, frozen in self._links:
            frozen[0] = True

    async def _link(self, client: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target)
        except OSError:
            await trio.aclose_forcefully(client)
            return
        frozen = [False]
        with trio.CancelScope() as scope:
            self._links.append((scope, frozen))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pipe, client, upstream, frozen)
                nursery.start_soon(self._pipe, upstream, client, frozen)
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(upstream)

    @staticmethod
    async def _pipe(source: trio.SocketStream, sink: trio.SocketStream,
                    frozen: list[bool]) -> None:
        try:
            while data := await source.receive_some(65536):
                if frozen[0]:
                    await trio.sleep_forever()
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await trio.aclose_forcefully(sink)


async def proxy_to(nursery: trio.Nursery, relay: RelayProcess) -> Proxy:
    proxy = Proxy(relay.port)
    await nursery.start(proxy.run)
    return proxy


def all_tasks() -> set[trio.lowlevel.Task]:
    root = trio.lowlevel.current_root_task()
    assert root is not None
    found: set[trio.lowlevel.Task] = set()
    stack = [root]
    while stack:
        task = stack.pop()
        found.add(task)
        for child in task.child_nurseries:
            stack.extend(child.child_tasks)
    return found


# -- pure ----------------------------------------------------------------------------------------

def test_backoff_grows_exponentially_to_the_cap_with_full_jitter() -> None:
    top = [backoff(attempt, 0.5, 30.0, rand=lambda: 1.0) for attempt in range(10)]
    assert top == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    assert backoff(10_000, 0.5, 30.0, rand=lambda: 1.0) == 30.0  # no overflow, still capped
    assert [backoff(attempt, 0.5, 30.0, rand=lambda: 0.0) for attempt in range(3)] == [0, 0, 0]
    draw = random.Random(7).random
    delays = [backoff(6, 0.5, 30.0, rand=draw) for _ in range(200)]
    assert all(0 <= delay < 30.0 for delay in delays)
    # Spread over the whole range, not bunched: clients cut off together come back apart.
    assert min(delays) < 3 and max(delays) > 27 and len(set(delays)) == 200


def test_endpoint_builds_the_request_target_and_names_it_without_secrets() -> None:
    endpoint = Endpoint.parse("ws://relay.example:3000/chat?x=1",
                              ["payload.market_id=eq.7", "payload.s=eq.a b&c"])
    assert (endpoint.host, endpoint.port, endpoint.secure, endpoint.host_header) == (
        "relay.example", 3000, False, "relay.example:3000")
    assert endpoint.resource(None) == (
        "/chat?x=1&filter=payload.market_id%3Deq.7&filter=payload.s%3Deq.a+b%26c")
    assert endpoint.resource("0a.1f.00ff").endswith("&from=0a.1f.00ff")
    assert Endpoint.parse("wss://relay.example").host_header == "relay.example"
    assert Endpoint.parse("wss://relay.example").resource(None) == "/"
    jwt_text = token({"mode": "r"})
    for url, shown in ((f"ws://h:3000/chat/{jwt_text}?jwt={jwt_text}", "h:3000/chat/…"),
                       (f"ws://h:3000/{jwt_text}", "h:3000/…"),
                       ("wss://h/chat", "h:443/chat")):
        assert str(Endpoint.parse(url)) == shown
    for bad in ("http://h/chat", "ws:///chat", "ws://h/chat?from=0a.1.00"):
        with pytest.raises(ValueError):
            Endpoint.parse(bad)
    with pytest.raises(ValueError, match="not a position"):
        subscribe("ws://h/chat", position="nope")


# -- against the relay ---------------------------------------------------------------------------

async def test_messages_arrive_in_order_with_positions_and_filters_apply(
        relay: RelayProcess, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # Every logger, trio-websocket's too.
    channel = unique_channel()
    jwt_text = reader(channel)
    with trio.fail_after(15):
        async with subscribe(relay.url(f"/{channel}"), token=jwt_text,
                             filters=["payload.keep=is.true"]) as subscription:
            await subscription.wait_connected()
            await send(relay, channel, *({"n": n, "keep": n % 2 == 0} for n in range(6)))
            got = [await anext(subscription) for _ in range(3)]
    assert [number(message)["n"] for message in got] == [0, 2, 4]  # type: ignore[index]
    positions = [SEALER.open(message.position or "")[0] for message in got]
    assert positions[0].seq < positions[1].seq < positions[2].seq
    assert subscription.position == got[-1].position
    assert "connected to 127.0.0.1" in caplog.text and jwt_text not in caplog.text


async def test_start_position_replays_what_was_missed_or_says_it_expired(
        start_relay: Callable[..., RelayProcess]) -> None:
    relay = await start(start_relay, PGWS_HISTORY_MESSAGES="5")
    channel = unique_channel()
    url, jwt_text = relay.url(f"/{channel}"), reader(channel)
    with trio.fail_after(15):
        async with subscribe(url, token=jwt_text) as subscription:
            await subscription.wait_connected()
            await send(relay, channel, 0)
            first = await anext(subscription)
        await send(relay, channel, 1, 2, 3)  # Nobody listens.
        async with subscribe(url, token=jwt_text, position=first.position) as subscription:
            missed = [await anext(subscription) for _ in range(3)]
        assert [number(message) for message in missed] == [1, 2, 3]
        await send(relay, channel, *range(4, 14))  # Ten more: past the history of five.
        async with subscribe(url, token=jwt_text, position=missed[-1].position) as subscription:
            lost = await anext(subscription)
            await send(relay, channel, 99)
            after = await anext(subscription)
    assert isinstance(lost, Lost) and lost.reason == "expired"
    assert parse_position(lost.position or "") is not None
    assert number(after) == 99 and subscription.position == after.position


class Producer:
    """Commits notifications 0, 1, 2, … (in transactions of one to three) until stopped, then
    ``"end"``."""

    def __init__(self, relay: RelayProcess, channel: str) -> None:
        self.relay, self.channel = relay, channel
        self.count = 0
        self.stop = trio.Event()

    async def run(self) -> None:
        listen = self.relay.env["PGWS_LISTEN_CHANNEL"]
        db = await trio.to_thread.run_sync(lambda: psycopg.connect(DB_URI))

        def commit(numbers: Sequence[object]) -> None:
            for n in numbers:
                db.execute("SELECT pg_notify(%s, %s)", (listen, payload(self.channel, n)))
            db.commit()

        try:
            while not self.stop.is_set():
                batch = list(range(self.count, self.count + 1 + self.count % 3))
                await trio.to_thread.run_sync(commit, batch)
                self.count += len(batch)
            await trio.to_thread.run_sync(commit, ["end"])
        finally:
            db.close()


async def test_reconnects_resume_with_no_gap_and_no_duplicate_while_commits_go_on(
        start_relay: Callable[..., RelayProcess], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.client.subscription")
    relay = await start(start_relay, PGWS_HISTORY_MESSAGES="100000")
    channel = unique_channel()
    received: list[object] = []
    async with trio.open_nursery() as nursery:
        proxy = await proxy_to(nursery, relay)
        with trio.fail_after(30):
            async with subscribe(proxy.url(f"/{channel}"), token=reader(channel),
                                 **FAST) as subscription:
                await subscription.wait_connected()
                producer = Producer(relay, channel)
                nursery.start_soon(producer.run)
                async for message in subscription:
                    n = number(message)
                    if n == "end":
                        break
                    received.append(n)
                    cuts = subscription.connections - 1
                    if cuts < 3 and len(received) >= 100 * (cuts + 1) \
                            and subscription.connected:
                        proxy.cut()  # Mid-stream: the producer is still committing.
                    if cuts == 3 and len(received) >= 400:
                        producer.stop.set()
        nursery.cancel_scope.cancel()
    assert subscription.connections == 4
    assert received == list(range(producer.count))
    # The resumes had something to replay: commits went on while the client was away.
    replayed = [int(match.group(1)) for record in caplog.records
                if (match := re.search(r"resumed after \S+: (\d+) missed", record.getMessage()))]
    assert len(replayed) == 3 and sum(replayed) > 0


async def test_callable_token_is_called_again_after_3001_and_a_fixed_one_raises(
        relay: RelayProcess) -> None:
    channel = unique_channel()
    calls: list[int] = []

    async def fresh_token() -> str:
        calls.append(1)  # The first expires within three seconds; later ones never.
        return reader(channel, exp=int(time.time()) + 3) if len(calls) == 1 else reader(channel)

    expiring = reader(channel, exp=int(time.time()) + 3)
    with trio.fail_after(15):
        async with subscribe(relay.url(f"/{channel}"), token=fresh_token, **FAST) as refreshed, \
                subscribe(relay.url(f"/{channel}"), token=expiring) as fixed:
            await refreshed.wait_connected()
            await fixed.wait_connected()
            await send(relay, channel, 0)
            assert number(await anext(refreshed)) == 0
            with pytest.raises(Closed) as closed:
                async for _ in fixed:
                    pass
            await refreshed.wait_connected(2)
            await send(relay, channel, 1)
            assert number(await anext(refreshed)) == 1
    assert (closed.value.code, closed.value.reason) == (3001, "JWT expired")
    assert len(calls) == 2


async def test_relay_restart_reconnects_when_back_and_reports_unknown(
        start_relay: Callable[..., RelayProcess]) -> None:
    port = str(free_port())
    first = await start(start_relay, PGWS_PORT=port)
    channel = unique_channel()
    with trio.fail_after(20):
        async with subscribe(first.url(f"/{channel}"), token=reader(channel),
                             **FAST) as subscription:
            await subscription.wait_connected()
            await send(first, channel, 0)
            before = await anext(subscription)
            await trio.to_thread.run_sync(first.stop)
            # Connections are refused while it is down, and retried.
            second = await start(start_relay, PGWS_PORT=port,
                                 PGWS_LISTEN_CHANNEL=first.env["PGWS_LISTEN_CHANNEL"])
            lost = await anext(subscription)
            await send(second, channel, 1)
            after = await anext(subscription)
    assert number(before) == 0 and number(after) == 1
    assert isinstance(lost, Lost) and lost.reason == "unknown"
    assert subscription.connections == 2
    old, new = SEALER.open(before.position or "")[0], SEALER.open(after.position or "")[0]
    assert old.epoch != new.epoch


async def test_a_listener_gap_while_connected_is_a_lost_event(
        start_relay: Callable[..., RelayProcess]) -> None:
    application = unique_channel("pgws_subscription_gap")
    relay = await start(start_relay, PGWS_DB_URI=f"{DB_URI}?application_name={application}")
    channel = unique_channel()

    def terminate_listener() -> int:
        with psycopg.connect(DB_URI, autocommit=True) as db:
            return len(db.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s AND query ILIKE 'LISTEN%%'", (application,)
            ).fetchall())

    with trio.fail_after(20):
        async with subscribe(relay.url(f"/{channel}"), token=reader(channel)) as subscription:
            await subscription.wait_connected()
            await send(relay, channel, 0)
            assert number(await anext(subscription)) == 0
            assert await trio.to_thread.run_sync(terminate_listener) >= 1
            gap = await anext(subscription)
            await send(relay, channel, 1)
            after = await anext(subscription)
    assert isinstance(gap, Lost) and gap.reason == "gap"
    assert number(after) == 1 and subscription.connections == 1  # The same connection.


async def test_a_connection_closed_during_the_handshake_is_retried_at_once(
        relay: RelayProcess, flag: Callable[[str], trio.Event]) -> None:
    channel = unique_channel()
    async with trio.open_nursery() as nursery:
        proxy = Proxy(free_port())  # A TCP proxy whose backend is down: accept, then close.
        await nursery.start(proxy.run)
        with trio.fail_after(10):  # Far below connect_timeout.
            async with subscribe(proxy.url(f"/{channel}"), token=reader(channel),
                                 connect_timeout=600.0, **FAST) as subscription:
                await flag("during the handshake").wait()
                proxy.target = relay.port
                await subscription.wait_connected()
                await send(relay, channel, 0)
                assert number(await anext(subscription)) == 0
        nursery.cancel_scope.cancel()


async def test_a_silent_connection_is_noticed_by_ping_and_replaced(
        relay: RelayProcess) -> None:
    channel = unique_channel()
    async with trio.open_nursery() as nursery:
        proxy = await proxy_to(nursery, relay)
        with trio.fail_after(15):
            async with subscribe(proxy.url(f"/{channel}"), token=reader(channel),
                                 ping_interval=0.2, ping_timeout=0.5, **FAST) as subscription:
                await subscription.wait_connected()
                await send(relay, channel, 0)
                assert number(await anext(subscription)) == 0
                proxy.freeze()  # No error, no close: the bytes just stop coming.
                await send(relay, channel, 1)
                # It can only come from a new connection, resumed after 0.
                assert number(await anext(subscription)) == 1
        nursery.cancel_scope.cancel()
    assert subscription.connections == 2


async def test_a_slow_caller_is_not_taken_for_a_dead_connection(relay: RelayProcess) -> None:
    channel = unique_channel()
    with trio.fail_after(15):
        async with subscribe(relay.url(f"/{channel}"), token=reader(channel), buffer=1,
                             ping_interval=0.1, ping_timeout=0.2) as subscription:
            await subscription.wait_connected()
            await send(relay, channel, *range(10))
            got = [await anext(subscription)]
            # The caller is busy for longer than several ping timeouts; meanwhile the reader
            # is stopped with messages in hand, so pongs go unread.
            await trio.sleep(1.0)
            got += [await anext(subscription) for _ in range(9)]
    assert [number(message) for message in got] == list(range(10))
    assert subscription.connections == 1


class _Flag(logging.Handler):
    """Sets an event when the library logs a line with ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.event = text, trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


@pytest.fixture
def flag() -> Iterator[Callable[[str], trio.Event]]:
    library = logging.getLogger("relay.client.subscription")
    handlers: list[logging.Handler] = []
    level = library.level
    library.setLevel(logging.INFO)

    def make(text: str) -> trio.Event:
        handler = _Flag(text)
        handlers.append(handler)
        library.addHandler(handler)
        return handler.event

    yield make
    for handler in handlers:
        library.removeHandler(handler)
    library.setLevel(level)


@pytest.mark.parametrize("state", ["connected", "backing off", "handshaking"])
async def test_cancelling_stops_everything_at_once(
        state: str, start_relay: Callable[..., RelayProcess],
        flag: Callable[[str], trio.Event]) -> None:
    channel = unique_channel()
    slow: dict[str, Any] = {"connect_timeout": 600.0, "backoff_min": 600.0, "backoff_max": 600.0,
            "ping_interval": 600.0}
    accepted = trio.Event()
    held: list[trio.SocketStream] = []

    async def accept_and_say_nothing(listener: trio.SocketListener) -> None:
        held.append(await listener.accept())
        accepted.set()

    async with trio.open_nursery() as nursery:
        if state == "handshaking":
            listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
            nursery.start_soon(accept_and_say_nothing, listener)
            url = f"ws://127.0.0.1:{listener.socket.getsockname()[1]}/{channel}"
        elif state == "backing off":
            url = f"ws://127.0.0.1:{free_port()}/{channel}"  # Nothing listens there.
        else:
            url = (await start(start_relay)).url(f"/{channel}")
        before = all_tasks()
        with trio.fail_after(10):  # Far below any timeout of the subscription.
            with trio.CancelScope() as scope:
                async with subscribe(url, token=reader(channel), **slow) as subscription:
                    assert all_tasks() > before
                    if state == "connected":
                        await subscription.wait_connected()
                    elif state == "backing off":
                        await flag("reconnecting in").wait()
                    else:
                        await accepted.wait()
                    scope.cancel()
                    await anext(subscription)
            assert scope.cancelled_caught
        assert not all_tasks() - before  # Nothing of the subscription's is left running.
        nursery.cancel_scope.cancel()
    for stream in held:
        await stream.aclose()


async def test_refusals_are_raised_from_the_iterator(relay: RelayProcess) -> None:
    channel = unique_channel()
    expired = reader(channel, exp=int(time.time()) - 10)
    cases: list[tuple[object, str]] = [
        (token({"mode": "r", "channel": channel}, "x" * 32), "JWSError"),
        (expired, "Token expired"),
        (lambda: expired, "Token expired"),  # A callable that cannot refresh it.
        (reader("elsewhere"), "No allowed channels"),
    ]
    with trio.fail_after(15):
        for jwt, body in cases:
            with pytest.raises(Refused) as refused:
                async with subscribe(relay.url(f"/{channel}"), token=jwt,  # type: ignore[arg-type]
                                     **FAST) as subscription:
                    async for _ in subscription:
                        pass
            assert refused.value.status == 400 and body in refused.value.body
        with pytest.raises(Refused) as refused:
            async with subscribe(relay.url(f"/{channel}"), token=reader(channel),
                                 filters=["payload.n=like.1"]) as subscription:
                await subscription.wait_connected()  # Raises, rather than wait for ever.
        assert "unknown operator" in refused.value.body


async def test_without_history_messages_have_no_position_and_reconnects_say_unsupported(
        start_relay: Callable[..., RelayProcess]) -> None:
    relay = await start(start_relay, PGWS_HISTORY_MESSAGES="0")
    channel = unique_channel()
    async with trio.open_nursery() as nursery:
        proxy = await proxy_to(nursery, relay)
        with trio.fail_after(15):
            async with subscribe(proxy.url(f"/{channel}"), token=reader(channel),
                                 **FAST) as subscription:
                await subscription.wait_connected()
                await send(relay, channel, 0)
                first = await anext(subscription)
                proxy.cut()
                lost = await anext(subscription)
                await subscription.wait_connected(2)
                await send(relay, channel, 1)
                second = await anext(subscription)
            started_after = Position(epoch=1, seq=1, digest=1).text()  # Well formed.
            async with subscribe(relay.url(f"/{channel}"), token=reader(channel),
                                 position=started_after) as resuming:
                refused_resume = await anext(resuming)
                await send(relay, channel, 2)
                third = await anext(resuming)
        nursery.cancel_scope.cancel()
    assert first == Message(payload(channel, 0), None)
    assert lost == Lost(UNSUPPORTED, None) == refused_resume
    assert second == Message(payload(channel, 1), None)
    assert third == Message(payload(channel, 2), None)
    assert subscription.position is None and resuming.position is None
