"""The idle set (relay/transports/idle.py) with real sockets: what wakes a resting connection,
and what becomes of the ones still resting when it stops."""

from __future__ import annotations

import socket
from math import inf

import trio
import trio.testing

from relay.transports.idle import IdleConnections


class Connection:
    """A socket that may rest, and what happened to it."""

    def __init__(self, expiry: float = inf) -> None:
        self.ours, self.peer = socket.socketpair()
        self.ours.setblocking(False)
        self._expiry = expiry
        self.woken = 0
        self.abandoned = False
        self.settled = trio.Event()

    def settle(self) -> bool:
        """Takes b"pong" where it rests (as the relay's clients take pongs); anything else
        is left for a task."""
        if self.ours.recv(64, socket.MSG_PEEK) != b"pong":
            return False
        self.ours.recv(64)
        self.settled.set()
        return True

    def fileno(self) -> int:
        return self.ours.fileno()

    def expiry(self) -> float:
        return self._expiry


async def _running(idle: IdleConnections, nursery: trio.Nursery) -> None:
    await nursery.start(idle.run)


async def test_bytes_from_the_peer_wake_only_that_connection() -> None:
    woke = trio.Event()

    async def serve(connection: Connection) -> None:
        connection.woken += 1
        woke.set()

    idle = IdleConnections(serve, lambda connection: None)
    async with trio.open_nursery() as nursery:
        await _running(idle, nursery)
        quiet, talking = Connection(), Connection()
        idle.rest(quiet)
        idle.rest(talking)
        assert len(idle) == 2 and idle.resting(talking)
        talking.peer.send(b"x")
        await woke.wait()
        assert (quiet.woken, talking.woken) == (0, 1)
        assert idle.resting(quiet) and not idle.resting(talking)
        idle.wake(talking)  # Not resting: nothing happens.
        nursery.cancel_scope.cancel()
    assert talking.woken == 1


async def test_bytes_a_connection_settles_where_it_rests_wake_nothing() -> None:
    woke = trio.Event()

    async def serve(connection: Connection) -> None:
        connection.woken += 1
        woke.set()

    idle = IdleConnections(serve, lambda connection: None)
    async with trio.open_nursery() as nursery:
        await _running(idle, nursery)
        connection = Connection()
        idle.rest(connection)
        connection.peer.send(b"pong")
        await connection.settled.wait()
        assert idle.resting(connection) and connection.woken == 0
        connection.peer.send(b"message")  # Not settled: this one needs a task.
        await woke.wait()
        assert not idle.resting(connection) and connection.woken == 1
        nursery.cancel_scope.cancel()


async def test_a_connection_is_woken_at_its_expiry_and_not_before() -> None:
    woken: list[float] = []
    done = trio.Event()

    async def serve(connection: Connection) -> None:
        woken.append(trio.current_time())
        done.set()

    idle = IdleConnections(serve, lambda connection: None)
    async with trio.open_nursery() as nursery:
        await _running(idle, nursery)
        due = trio.current_time() + 0.2
        late, early = Connection(expiry=due + 3600), Connection(expiry=due)
        idle.rest(late)
        idle.rest(early)  # Earlier than the wait's deadline: the wait is shortened.
        await done.wait()
        assert woken[0] >= due and not idle.resting(early) and idle.resting(late)
        nursery.cancel_scope.cancel()


async def test_a_forgotten_descriptor_does_not_wake_the_connection_that_reuses_it() -> None:
    woken: list[Connection] = []

    async def serve(connection: Connection) -> None:
        woken.append(connection)

    idle = IdleConnections(serve, lambda connection: None)
    async with trio.open_nursery() as nursery:
        await _running(idle, nursery)
        first = Connection(expiry=trio.current_time() + 3600)
        idle.rest(first)
        idle.wake(first)
        idle.forget(first)
        other = Connection(expiry=trio.current_time() + 7200)
        other.fileno = first.fileno  # type: ignore[method-assign]  # The same descriptor.
        idle.forget(first)  # Ended again: the other connection's entry is not the first's.
        idle.rest(other)
        idle.forget(first)
        assert idle.resting(other)
        nursery.cancel_scope.cancel()
    assert woken == [first]


async def test_stopping_waits_for_the_woken_and_cancelling_abandons_the_resting() -> None:
    abandoned: list[Connection] = []
    idle = IdleConnections(trio.sleep_forever, abandoned.append)  # type: ignore[arg-type]
    with trio.move_on_after(5):
        async with trio.open_nursery() as nursery:
            await _running(idle, nursery)
            resting = Connection()
            idle.rest(resting)
            idle.stop()
            assert not idle.open
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert abandoned == [resting] and len(idle) == 0


async def test_a_stopped_set_with_nobody_resting_returns() -> None:
    idle = IdleConnections(trio.sleep_forever, lambda connection: None)  # type: ignore[arg-type]
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await _running(idle, nursery)
            assert idle.open
            idle.stop()
