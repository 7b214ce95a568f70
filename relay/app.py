"""The nursery that wires the rooms together and owns their lifetimes.

Theory of operation
-------------------
:func:`run` opens the port first (so clients can connect while the database is still being
reached, as upstream), then runs, each in the root nursery: the signal watcher, the listener,
the pinger and the accept loop, whose connection handlers live in a nursery of their own.
A stop (SIGTERM/SIGINT, or the listener giving up) makes ``/ready`` answer 503, closes the
listening sockets (new connections are refused, so a balancer sends them to another relay),
sends close 1001 to every client (the client library resumes elsewhere) and gives them what
is left of ``shutdown_timeout`` once time to tear down the silent ones is set aside, then
cancels everything. The exit status is 0 after a signal and 1 when the listener gave up.
SIGUSR1 logs one ``stats:`` line (clients, tasks, open file descriptors, counters;
:mod:`relay.core.stats`).

No business logic lives here: only who starts, who stops, and in which order.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import ssl
from collections.abc import Sequence
from typing import Any

import trio
from psycopg.conninfo import conninfo_to_dict

from relay import __version__
from relay.auth import tokens
from relay.config import PG_NOTIFY_MAX_BYTES, Config
from relay.core import envelope, stats
from relay.core.history import History
from relay.core.hub import Hub
from relay.ops import admin, workers
from relay.sources.base import Source, SourceGaveUp, SourceMisconfigured
from relay.sources.nats import NatsSettings, NatsSource
from relay.sources.notifier import Notifier
from relay.sources.notify import NotifySource
from relay.sources.publisher import Publisher
from relay.sources.wal import WalSource
from relay.transports.server import Server
from relay.wire import frames, positions
from relay.wire.closecodes import GOING_AWAY

log = logging.getLogger("relay")

#: libpq waits this long for a connection unless the URI says otherwise: long enough for a
#: busy server, short enough that a dead one counts as a failed attempt soon.
_CONNECT_TIMEOUT = 5

#: Generation-0 threshold of the cyclic GC. Per-notification work allocates no cycles, but with
#: the default (700) the collector runs constantly under fan-out and scans every connection's
#: objects; a higher threshold keeps that cost away from the hot path.
_GC_THRESHOLD = 50_000

#: Pending connections the kernel may hold per listening socket; connection storms after a
#: restart (every client reconnecting at once) should queue, not be refused. The kernel caps
#: it at ``net.core.somaxconn`` (4096 by default): asking for the most a queue can hold lets an
#: operator who raises that sysctl get the longer queue (100,000 clients connecting at once
#: overflowed 8 queues of 4,096 and were refused or timed out: bench/scenarios/c100k.py).
_LISTEN_BACKLOG = 65535

#: Seconds of ``shutdown_timeout`` kept back per client for tearing down those that never
#: answer the close (cancelling and closing one took ~0.25 ms on a 2-core machine, see
#: ``bench/reliability/faults.py`` ``sigterm-silent``), so that the timeout bounds the whole stop,
#: not only the wait. At most half the timeout is kept back: clients deserve time to answer.
_TEARDOWN_PER_CLIENT = 0.0005

#: Seconds between position checkpoints to positioned clients (and history age checks): a
#: client whose filters rarely match still holds a position at most this old when it drops.
_CHECKPOINT_INTERVAL = 5.0

#: PGWS_HOST values with a special meaning (Warp's HostPreference); None binds every address.
_HOSTS: dict[str, str | None] = {"*4": "0.0.0.0", "!4": "0.0.0.0", "*": None, "*6": None,
                                 "!6": "::"}


def connect_options(db_uri: str) -> dict[str, Any]:
    """Defaults for libpq that the URI does not set itself."""
    given = conninfo_to_dict(db_uri)
    options: dict[str, Any] = {"client_encoding": "UTF8"}
    if "connect_timeout" not in given:
        options["connect_timeout"] = _CONNECT_TIMEOUT
    if "application_name" not in given:
        options["application_name"] = "pgws-relay"
    return options


async def _reuse_port_listeners(host: str | None, port: int) -> list[trio.SocketListener]:
    # trio.open_tcp_listeners cannot set SO_REUSEPORT; this binds the same addresses it would,
    # with that option, so that every worker process accepts on the one port.
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                          flags=socket.AI_PASSIVE)
    listeners = []
    for family, kind, proto, _, address in dict.fromkeys(
            (info[0], info[1], info[2], "", info[4]) for info in infos):
        sock = trio.socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            await sock.bind(address)
            sock.listen(_LISTEN_BACKLOG)
        except OSError:
            sock.close()
            for listener in listeners:
                listener.socket.close()
            raise
        listeners.append(trio.SocketListener(sock))
    return listeners


async def open_listeners(config: Config, reuse_port: bool = False
                         ) -> list[trio.abc.Listener[Any]]:
    """Bind the port (TLS-wrapped when configured). Raises OSError if it cannot be bound."""
    host = _HOSTS.get(config.host, config.host)
    listeners: list[trio.abc.Listener[Any]] = list(
        await _reuse_port_listeners(host, config.port) if reuse_port
        else await trio.open_tcp_listeners(config.port, host=host, backlog=_LISTEN_BACKLOG)
    )
    if config.tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        assert config.certificate_file is not None
        context.load_cert_chain(config.certificate_file, config.key_file)
        listeners = [trio.SSLListener(listener, context, https_compatible=True)
                     for listener in listeners]
    return listeners


def _bound(listener: trio.abc.Listener[Any]) -> str:
    inner = getattr(listener, "transport_listener", listener)
    host, port = inner.socket.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _task_count() -> int:
    """Tasks alive in this Trio run: with the connection count, a leak shows at once."""
    count, nurseries = 0, list(trio.lowlevel.current_root_task().child_nurseries)
    while nurseries:
        for task in nurseries.pop().child_tasks:
            count += 1
            nurseries.extend(task.child_nurseries)
    return count


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1  # Not Linux: unknown.


def _stats(hub: Hub, source: Source, notifier: Notifier) -> dict[str, int]:
    return stats.fields(clients=hub.client_count, tasks=_task_count(), fds=_open_fds(),
                        db_pool_idle=notifier.idle_connections,
                        db_pool_busy=notifier.busy_connections, notifications=source.received,
                        gaps=source.gaps, frames_offered=hub.offered,
                        streams=hub.stream_count, compressors=hub.deflaters,
                        compression_joins=hub.joins, compression_restarts=hub.restarts,
                        resumed=hub.resumes["resumed"], replayed=hub.replayed,
                        history_entries=hub.history.entries if hub.history else 0)


async def _watch_signals(stop: trio.Event, hub: Hub, source: Source,
                         notifier: Notifier) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
        async for signum in signals:
            if signum == signal.SIGUSR1:
                numbers = _stats(hub, source, notifier)
                log.info("stats: %s", " ".join(f"{name}={value}" for name, value in
                                               numbers.items()),
                         extra={"event": "stats", "stats": numbers})
                continue
            log.info("received %s, shutting down", signal.Signals(signum).name)
            stop.set()


async def _end_with_supervisor(lifeline: int) -> None:
    """A worker stops as after SIGTERM once its supervisor is gone (even killed outright)."""
    await workers.until_supervisor_ends(lifeline)
    log.info("the supervisor is gone")
    os.kill(os.getpid(), signal.SIGTERM)


async def _ping(hub: Hub, interval: float) -> None:
    while True:
        await trio.sleep(interval)
        hub.ping_all()


#: Clients let in per turn once the source caught up: each may replay a whole history (~0.5 ms
#: for 1,000 entries here: 5,000 at once held the loop 2.6 s), so a restart that every client
#: comes back to does not stall the relay.
_LET_IN_PER_TURN = 20


async def _let_in(hub: Hub, caught_up: trio.Event) -> None:
    """Once the source caught up, let the waiting clients in, a few per turn."""
    await caught_up.wait()
    while hub.caught_up(_LET_IN_PER_TURN):
        await trio.sleep(0)


async def _checkpoints(hub: Hub) -> None:
    while True:
        await trio.sleep(_CHECKPOINT_INTERVAL)
        hub.checkpoint()


async def _open_admin(config: Config, admin_socket: str | None
                      ) -> list[trio.SocketListener]:
    if admin_socket is not None:  # A worker: the supervisor serves the admin port.
        return [await admin.open_unix_listener(admin_socket)]
    if config.admin_port is None:
        return []
    return await admin.open_admin_listeners(config.admin_host, config.admin_port)


async def run(config: Config, keys: Sequence[tokens.Key], sealer: positions.Sealer,
              reuse_port: bool = False, admin_socket: str | None = None,
              lifeline: int | None = None) -> int:
    """Run the relay until a signal (exit status 0) or until the listener gives up (1).

    ``keys``: the verification keys of ``config.jwt_secret``, read by the command before it
    starts (:func:`relay.auth.tokens.read_secret`), so that a secret without a usable key is a
    configuration error before anything binds. ``sealer``: seals the positions clients see
    (:mod:`relay.auth.sealing`). ``reuse_port``: bind with SO_REUSEPORT, as one
    of several worker processes. ``admin_socket``: a worker's private Unix socket for the
    admin endpoints, which the supervisor serves on ``PGWS_ADMIN_PORT`` for all workers.
    ``lifeline``: a worker's end of the pipe its supervisor holds (:func:`relay.ops.workers.
    lifeline`): at its EOF the worker stops. Exit status 1 also when the port or the admin port
    cannot be bound.
    """
    options = connect_options(config.db_uri)
    history = History(config.history_messages, config.history_bytes, config.history_seconds,
                      sealer=sealer) if config.history_messages else None
    hub = Hub(config.listen_channel, config.compression_streams, history,
              encoding=frames.TEXT_FRAMES)
    # With the log (wal) or the stream the feeder fills from it (nats), writes go to the log.
    logged = config.source != "notify"
    notifier = Notifier(config.db_uri, config.pool_size, options,
                        log_prefix=config.listen_channel if logged else None)
    publisher = Publisher(notifier, config.listen_channel, config.meta_channel,
                          config.max_payload_bytes if logged else PG_NOTIFY_MAX_BYTES - 1)
    meta = config.meta_channel

    def on_gap(since: float, until: float) -> None:
        # Only this process's clients missed notifications: tell them directly, not by NOTIFY.
        if meta is not None:
            hub.publish([envelope.listener_reconnected(meta, since, until)], local=True)

    source: NotifySource | WalSource | NatsSource
    caught_up = trio.Event()  # The source has read back its history (Hub.caught_up).
    if logged and history is not None:
        # Positions are places in the log (or stream), and a relay started again reads its
        # history back: clients wait for that (Hub.caught_up), then enter as usual.
        hub.catching_up = True
    if config.source == "nats":
        source = NatsSource(NatsSettings.of(config), hub.publish, config.retries,
                            config.history_seconds,
                            on_log=None if history is None else history.adopt_log,
                            on_caught_up=caught_up.set, on_listening=hub.listening,
                            channel=config.listen_channel, on_backfilled=hub.backfilled,
                            on_unavailable=hub.backfill_unavailable,
                            backfill_bytes=config.max_queue_bytes // 2)
        if history is not None:
            hub.backfill = source.backfill  # Resumes older than the history read the stream.
    elif config.source == "wal":
        assert config.wal_slot is not None  # The configuration requires it.
        source = WalSource(config.db_uri, options, config.listen_channel, config.wal_slot,
                           config.wal_publication, config.max_payload_bytes, hub.publish,
                           config.heartbeat_interval, config.retries, on_gap, hub.listening,
                           on_loss=hub.listening,
                           on_log=None if history is None else history.adopt_log,
                           on_caught_up=caught_up.set,
                           holding=None if history is None else history.oldest)
    else:
        source = NotifySource(config.db_uri, options, config.listen_channel, hub.publish,
                              notifier, config.heartbeat_interval, config.retries, on_gap,
                              hub.listening)
    try:
        listeners = await open_listeners(config, reuse_port)
    except (OSError, ssl.SSLError) as exc:
        log.error("cannot listen on %s port %d: %s", config.host, config.port, exc)
        return 1
    try:
        admin_listeners = await _open_admin(config, admin_socket)
    except OSError as exc:
        for opened in listeners:
            await opened.aclose()
        log.error("cannot open the admin listener (PGWS_ADMIN_HOST %s, PGWS_ADMIN_PORT %s): %s",
                  config.admin_host, config.admin_port, exc)
        return 1
    log.info("pgws-relay %s: connects websockets to PostgreSQL asynchronous notifications",
             __version__)
    log.info("listening on %s%s", ", ".join(map(_bound, listeners)),
             " (TLS)" if config.tls else "")
    if admin_listeners and admin_socket is None:
        log.info("admin listening on %s (/health, /ready, /metrics)",
                 admin.bound(admin_listeners))

    gc.collect()
    gc.freeze()  # What start-up allocated lives forever; keep it out of every collection.
    gc.set_threshold(_GC_THRESHOLD, *gc.get_threshold()[1:])

    exit_code = 0
    stop = trio.Event()
    probe = admin.LocalProbe(hub, source, notifier, stopping=stop.is_set)

    async def listen() -> None:
        nonlocal exit_code
        try:
            await source.run()
        except SourceGaveUp as exc:
            log.critical("listener gave up: %s; exiting", exc)
            exit_code = 1
            stop.set()
        except SourceMisconfigured as exc:
            log.critical("%s", exc)
            exit_code = 2
            stop.set()

    async with trio.open_nursery() as root:
        server = Server(config, keys, hub, publisher, background=root)
        root.start_soon(_watch_signals, stop, hub, source, notifier)
        if lifeline is not None:
            root.start_soon(_end_with_supervisor, lifeline)
        root.start_soon(listen)
        if hub.catching_up:
            root.start_soon(_let_in, hub, caught_up)
        root.start_soon(_ping, hub, config.ping_interval)
        if history is not None:
            root.start_soon(_checkpoints, hub)
        if admin_listeners:
            root.start_soon(admin.AdminServer(probe).serve, admin_listeners)
        async with trio.open_nursery() as connections:
            await connections.start(server.idle.run)
            accepting = trio.CancelScope()

            async def accept() -> None:
                with accepting:
                    await server.serve(listeners, connections)
                # serve has closed the listening sockets on its way out: a
                # connection arriving now is refused at once (a balancer retries it on another
                # relay) instead of waiting in the kernel's queue until the process exits.

            connections.start_soon(accept)
            await stop.wait()
            accepting.cancel()
            server.shut_down()
            log.info("closing %d clients (1001)", hub.client_count)
            hub.close_all(GOING_AWAY, "going away")
            teardown = min(config.shutdown_timeout / 2, hub.client_count * _TEARDOWN_PER_CLIENT)
            connections.cancel_scope.deadline = (trio.current_time() + config.shutdown_timeout
                                                 - teardown)
        root.cancel_scope.cancel()
    await notifier.aclose()
    log.info("stopped; %s", stats.line(notifications=source.received, gaps=source.gaps,
                                       frames_offered=hub.offered))
    return exit_code
