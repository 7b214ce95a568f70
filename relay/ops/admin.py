"""The operators' HTTP listener: ``/health``, ``/ready`` and ``/metrics``, apart from the clients'.

Theory of operation
-------------------
``PGWS_ADMIN_PORT`` opens a second listener (on ``PGWS_ADMIN_HOST``, loopback by default) so
that nothing on the WebSocket port changes: static files there may have any name. Each admin
connection carries one request, answered and closed (``Connection: close``):

========== ====================================================================================
``/health`` 200 ``ok`` while the process serves.
``/ready``  200 ``ready`` only while LISTEN is in place; 503 with a one-line reason otherwise
            (database unreachable, listener reconnecting, shutting down), so that a balancer
            sends new clients elsewhere.
``/metrics`` Prometheus text format, rendered by ``prometheus_client`` from a collector that
            reads, at scrape time, the plain integers the fan-out path keeps anyway (the hub's,
            the listener's, :data:`relay.core.stats.counters`), plus the library's process, GC and
            platform collectors. The hot path never calls into this module.
========== ====================================================================================

With several workers (``PGWS_WORKERS`` > 1) the supervisor serves the admin port and each
worker serves the same endpoints on a private Unix socket; :class:`WorkersProbe` asks every
worker and answers for all of them: ``/ready`` is 200 only when every worker is ready, and one
``/metrics`` scrape holds every worker's samples with a ``worker`` label, merged by the library's
parser and exposition (no hand-written format).

Bounds (the port is an operator's, but still an input): a request head of at most
``_MAX_HEAD`` bytes within ``_REQUEST_TIMEOUT`` seconds, an answer written within the same
time, at most ``_MAX_CONNECTIONS`` admin connections at once (more are closed unanswered).
Errors of one connection end that connection, never the listener.

This module never touches the fan-out path: it only reads what the other rooms count.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from http import HTTPStatus
from typing import Any, NamedTuple, Protocol

import h11
import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from relay import __version__
from relay.core.hub import Hub
from relay.core.limits import AddressCount, network_of
from relay.core.stats import REFUSAL_REASONS, counters
from relay.sources.base import Source
from relay.sources.notifier import Notifier

log = logging.getLogger(__name__)

#: Bytes of request head an admin client may send: a probe's GET is a few hundred.
_MAX_HEAD = 8192

#: Seconds an admin connection has to send its request head: a probe or a scraper sends it
#: with the connection, so longer is a client holding a slot.
_HEAD_TIMEOUT = 2.0

#: Seconds an admin connection has in all, its answer included (a scrape of many workers
#: takes up to WORKER_TIMEOUT): probes time out after a few seconds themselves.
_REQUEST_TIMEOUT = 10.0

#: Admin connections served at once; a scraper and a few probes need a handful. When all are
#: taken, the oldest is closed for the newcomer: probes ask and are answered in milliseconds,
#: so connections held open (64 idle ones once starved /health and /ready, and so HAProxy and
#: Kubernetes restarted healthy relays; or ones that never read their answer) cannot keep one
#: out.
_MAX_CONNECTIONS = 64

#: Admin connections one client address (IPv6: one /64) may hold over TCP: a probe, a scraper
#: and a person with curl. The supervisor's Unix sockets to its workers are not counted.
_MAX_PER_ADDRESS = 8

#: Seconds the supervisor waits for one worker's answer: a worker busy for longer than this
#: is reported as not answering rather than delaying the whole probe.
WORKER_TIMEOUT = 3.0

#: Bytes of one worker's answer the supervisor reads at most (metrics are ~20 KiB).
_MAX_WORKER_ANSWER = 4 * 1024 * 1024

_TEXT = "text/plain; charset=utf-8"


class Probe(Protocol):
    """What the admin listener asks: the answers to its three questions."""

    async def ready(self) -> str | None:
        """None when ready; else the one-line reason why not."""

    async def metrics(self) -> bytes:
        """The Prometheus text exposition."""


# -- one process ----------------------------------------------------------------------------


class _Sources(NamedTuple):
    """Where the numbers live: the rooms that count them on their own paths."""

    hub: Hub
    listener: Source
    notifier: Notifier


#: The single-valued metrics, as data: name, family (gauge or counter; a counter's name gets
#: ``_total``), help, and how to read the value at scrape time.
_METRICS: tuple[tuple[str, type[GaugeMetricFamily | CounterMetricFamily], str,
                      Callable[[_Sources], float]], ...] = (
    ("pgws_connections", GaugeMetricFamily, "Open WebSocket connections.",
     lambda s: s.hub.client_count),
    ("pgws_connections_accepted", CounterMetricFamily, "WebSocket connections upgraded.",
     lambda s: counters.accepted),
    ("pgws_notifications_received", CounterMetricFamily,
     "Notifications received on the listen channel.", lambda s: s.listener.received),
    ("pgws_notifications_routed", CounterMetricFamily,
     "Notifications that had at least one subscriber.", lambda s: s.hub.routed),
    ("pgws_frames_written", CounterMetricFamily,
     "Notification frames written, or queued for writing, to clients (one per subscriber).",
     lambda s: s.hub.offered),
    ("pgws_bytes_written", CounterMetricFamily,
     "Bytes of those frames; queued bytes dropped when a slow consumer is closed are in "
     "pgws_bytes_dropped_total.", lambda s: s.hub.offered_bytes),
    ("pgws_bytes_dropped", CounterMetricFamily,
     "Bytes queued for slow consumers and dropped unsent.", lambda s: counters.bytes_dropped),
    ("pgws_slow_consumers_closed", CounterMetricFamily,
     "Clients closed with 1013 as slow consumers.", lambda s: counters.slow_closed),
    ("pgws_client_writes_published", CounterMetricFamily,
     "Client messages published with NOTIFY (one per channel).",
     lambda s: counters.writes_published),
    ("pgws_client_writes_failed", CounterMetricFamily,
     "Client messages whose NOTIFY failed (client closed, 1011).",
     lambda s: counters.writes_failed),
    ("pgws_client_writes_rate_limited", CounterMetricFamily,
     "Clients closed with 1008 for writing faster than PGWS_MAX_WRITES_PER_SECOND.",
     lambda s: counters.rate_limited),
    ("pgws_clients_resting", GaugeMetricFamily,
     "Idle WebSocket clients waiting in the worker's epoll without a task of their own.",
     lambda s: counters.resting),
    ("pgws_clients_woken", CounterMetricFamily,
     "Times an idle client was given a task again (bytes from it, a write its socket did not "
     "take, a close, its token's exp).", lambda s: counters.woken),
    ("pgws_clients_pongs_at_rest", CounterMetricFamily,
     "Pongs read from resting clients without giving them a task.",
     lambda s: counters.pongs_at_rest),
    ("pgws_clients_inbound_limited", CounterMetricFamily,
     "Clients closed with 1008 for sending more frames or bytes than their inbound budget.",
     lambda s: counters.inbound_limited),
    ("pgws_protocol_errors", CounterMetricFamily,
     "Clients closed with 1002/1007 for breaking the WebSocket protocol.",
     lambda s: counters.protocol_errors),
    ("pgws_streams", GaugeMetricFamily,
     "Distinct streams: clients with the same channels and filters share one.",
     lambda s: s.hub.stream_count),
    ("pgws_compressors", GaugeMetricFamily,
     "Shared permessage-deflate compressors (one per stream with compressed clients, at most "
     "PGWS_COMPRESSION_STREAMS).", lambda s: s.hub.deflaters),
    ("pgws_compression_joins", CounterMetricFamily,
     "Compressed clients let into their stream's shared compressed frames.",
     lambda s: s.hub.joins),
    ("pgws_compression_restarts", CounterMetricFamily,
     "Shared compressors restarted so that clients could join (each costs the stream its "
     "history).", lambda s: s.hub.restarts),
    ("pgws_history_entries", GaugeMetricFamily,
     "Deliveries kept for clients that resume (all channels).",
     lambda s: s.hub.history.entries if s.hub.history else 0),
    ("pgws_history_bytes", GaugeMetricFamily,
     "Memory of those deliveries as PGWS_HISTORY_BYTES counts it (frames plus 512 bytes each).",
     lambda s: s.hub.history.bytes if s.hub.history else 0),
    ("pgws_replayed", CounterMetricFamily,
     "Deliveries replayed to clients that resumed.", lambda s: s.hub.replayed),
    ("pgws_notify_pool_busy", GaugeMetricFamily, "NOTIFY connections in use.",
     lambda s: s.notifier.busy_connections),
    ("pgws_notify_pool_idle", GaugeMetricFamily, "NOTIFY connections open and idle.",
     lambda s: s.notifier.idle_connections),
    ("pgws_listener_up", GaugeMetricFamily, "1 while LISTEN is in place, else 0.",
     lambda s: 1 if s.listener.status is None else 0),
    ("pgws_listener_gaps", CounterMetricFamily,
     "Times LISTEN was re-established after a loss (notifications committed in each gap are "
     "lost).", lambda s: s.listener.gaps),
    ("pgws_listener_down_seconds", CounterMetricFamily,
     "Seconds since start-up without LISTEN in place.", lambda s: s.listener.down_seconds()),
    ("pgws_listener_late_deadlines", CounterMetricFamily,
     "Heartbeat deadlines the relay noticed too late to count (its process was starved of "
     "CPU; the connection was kept).", lambda s: getattr(s.listener, "late_deadlines", 0)),
)


class RelayCollector(Collector):
    """The relay's numbers as metric families, read when a scrape asks for them."""

    def __init__(self, hub: Hub, listener: Source, notifier: Notifier) -> None:
        self._sources = _Sources(hub, listener, notifier)

    def collect(self) -> Iterator[Metric]:
        sources = self._sources
        yield InfoMetricFamily("pgws_build", "pgws-relay's version.",
                               value={"version": __version__})
        for name, family, documentation, read in _METRICS:
            yield family(name, documentation, value=read(sources))
        for name, (documentation, value) in sources.listener.gauges().items():
            yield GaugeMetricFamily(name, documentation, value=value)
        refused = CounterMetricFamily(
            "pgws_connections_refused",
            "WebSocket requests refused, by reason: token (400, upstream's texts), filter (400, a "
            "filter parameter that does not parse), position (400, a from= that cannot be "
            "taken), handshake "
            "(400/426), origin (403), capacity (503, PGWS_MAX_CONNECTIONS or a filter cap), "
            "resumes (429, PGWS_MAX_RESUMES_PER_SECOND_PER_IP), address (503, "
            "PGWS_MAX_CONNECTIONS_PER_IP), shutting_down (503).", labels=["reason"])
        for reason in REFUSAL_REASONS:
            refused.add_metric([reason], counters.refused[reason])
        yield refused
        resumes = CounterMetricFamily(
            "pgws_resumes",
            "Clients that came back with a position, by outcome: resumed (lossless), expired "
            "(fell out of the history), gap (LISTEN was lost after it), unknown.",
            labels=["outcome"])
        for outcome, count in sources.hub.resumes.items():
            resumes.add_metric([outcome], count)
        yield resumes
        times = sources.hub.delivery_times
        yield HistogramMetricFamily(
            "pgws_delivery_seconds",
            "Seconds from a notification's arrival at the listener to its last write to a "
            "subscriber (or its drop, for a slow consumer).",
            buckets=times.cumulative(), sum_value=times.sum)


class LocalProbe:
    """The answers of this process: its listener's state and its own numbers."""

    def __init__(self, hub: Hub, listener: Source, notifier: Notifier,
                 stopping: Callable[[], bool]) -> None:
        self._listener = listener
        self._stopping = stopping
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(RelayCollector(hub, listener, notifier))
        for collector in (PROCESS_COLLECTOR, GC_COLLECTOR, PLATFORM_COLLECTOR):
            self.registry.register(collector)

    async def ready(self) -> str | None:
        if self._stopping():
            return "shutting down"
        return self._listener.status

    async def metrics(self) -> bytes:
        return generate_latest(self.registry)


# -- several workers ------------------------------------------------------------------------


class _Families(Collector):
    """Already-built metric families, for the exposition of merged worker metrics."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def merge_worker_metrics(texts: Sequence[tuple[str, str]]) -> bytes:
    """``(worker, exposition)`` pairs → one exposition, every sample labelled ``worker``.

    Families of the same name are joined (their help and type are the first worker's), so a
    family appears once with every worker's samples, as Prometheus expects.
    """
    merged: dict[str, Metric] = {}
    for worker, text in texts:
        for family in text_string_to_metric_families(text):
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation,
                                                    family.type, family.unit)
            for sample in family.samples:
                into.samples.append(sample._replace(labels={**sample.labels, "worker": worker}))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(merged.values()))
    return generate_latest(registry)


class WorkersProbe:
    """The supervisor's answers: every worker asked over its Unix socket."""

    def __init__(self, sockets: Sequence[str]) -> None:
        self._sockets = list(sockets)
        self.stopping = False
        #: Workers that died and were started again (:mod:`relay.ops.workers`).
        self.restarts = 0

    async def _ask_all(self, path: bytes) -> list[tuple[int, bytes] | None]:
        answers: list[tuple[int, bytes] | None] = [None] * len(self._sockets)

        async def ask(index: int, socket_path: str) -> None:
            with trio.move_on_after(WORKER_TIMEOUT), contextlib.suppress(
                    OSError, trio.BrokenResourceError, h11.ProtocolError):
                answers[index] = await fetch_unix(socket_path, path)

        async with trio.open_nursery() as nursery:
            for index, socket_path in enumerate(self._sockets):
                nursery.start_soon(ask, index, socket_path)
        return answers

    async def ready(self) -> str | None:
        if self.stopping:
            return "shutting down"
        reasons = []
        for index, answer in enumerate(await self._ask_all(b"/ready")):
            if answer is None:
                reasons.append(f"worker {index}: not answering")
            elif answer[0] != 200:
                reasons.append(f"worker {index}: {answer[1].decode('utf-8', 'replace').strip()}")
        return "; ".join(reasons) or None

    async def metrics(self) -> bytes:
        texts = [(str(index), answer[1].decode("utf-8", "replace"))
                 for index, answer in enumerate(await self._ask_all(b"/metrics"))
                 if answer is not None and answer[0] == 200]
        return merge_worker_metrics(texts) + (
            b"# HELP pgws_worker_restarts_total Workers that died and were started again.\n"
            b"# TYPE pgws_worker_restarts_total counter\n"
            b"pgws_worker_restarts_total " + str(self.restarts).encode() + b".0\n")


async def fetch_unix(socket_path: str, path: bytes) -> tuple[int, bytes]:
    """``GET path`` over a Unix socket: ``(status, body)``. Raises on a broken answer."""
    stream = await trio.open_unix_socket(socket_path)
    async with stream:
        http = h11.Connection(h11.CLIENT)
        await stream.send_all(http.send(h11.Request(
            method="GET", target=path, headers=[("host", "worker"), ("connection", "close")])))
        await stream.send_all(http.send(h11.EndOfMessage()))
        status, body, size = 0, [], 0
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                size += len(data)
                if size > _MAX_WORKER_ANSWER:
                    raise h11.RemoteProtocolError("answer too large")
                http.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body.append(bytes(event.data))
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, b"".join(body)


# -- the listener ---------------------------------------------------------------------------


class _Slot:
    """One admin connection: its cancel scope, and whether a newcomer took its slot."""

    __slots__ = ("evicted", "scope")

    def __init__(self, scope: trio.CancelScope) -> None:
        self.scope = scope
        self.evicted = False


def _network(stream: trio.abc.Stream) -> str | None:
    """The client network of a TCP admin connection (None: a Unix socket, or unknown)."""
    sock = getattr(stream, "socket", None)
    if sock is None or sock.family not in (trio.socket.AF_INET, trio.socket.AF_INET6):
        return None
    try:
        return network_of(sock.getpeername()[0])
    except OSError:
        return None


class AdminServer:
    """Serves :class:`Probe` answers on the given listeners until cancelled."""

    def __init__(self, probe: Probe) -> None:
        self._probe = probe
        self._open = 0
        #: Open connections, oldest first: the candidates to close for a newcomer at the cap.
        self._waiting: dict[_Slot, None] = {}
        self._addresses = AddressCount(_MAX_PER_ADDRESS)

    async def serve(self, listeners: Sequence[trio.abc.Listener[Any]],
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept admin connections on ``listeners`` (closed when this returns)."""
        await trio.serve_listeners(self._handle, list(listeners), task_status=task_status)

    async def _handle(self, stream: trio.abc.Stream) -> None:
        network = _network(stream)
        if network is not None and not self._addresses.enter(network):
            await trio.aclose_forcefully(stream)  # Over its address's share: nobody gives way.
            return
        if self._open >= _MAX_CONNECTIONS and self._waiting:
            oldest = next(iter(self._waiting))  # Its slot passes to this one at once.
            del self._waiting[oldest]
            oldest.evicted = True
            oldest.scope.cancel()
            self._open -= 1
        if self._open >= _MAX_CONNECTIONS:
            if network is not None:
                self._addresses.leave(network)
            await trio.aclose_forcefully(stream)
            return
        self._open += 1
        slot = _Slot(trio.CancelScope(deadline=trio.current_time() + _REQUEST_TIMEOUT))
        self._waiting[slot] = None
        try:
            with slot.scope:
                await self._answer(stream, slot)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("internal error on an admin connection")
        finally:
            self._waiting.pop(slot, None)
            if not slot.evicted:
                self._open -= 1
            if network is not None:
                self._addresses.leave(network)
            await trio.aclose_forcefully(stream)

    async def _answer(self, stream: trio.abc.Stream, slot: _Slot) -> None:
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        try:
            with trio.fail_after(_HEAD_TIMEOUT):
                request = await _read_request(stream, http)
        except h11.RemoteProtocolError as exc:
            await _respond(stream, http, exc.error_status_hint, _TEXT, b"bad request\n")
            return
        except trio.TooSlowError:
            return
        # It has asked, but stays a candidate to close for a newcomer until it is done: one
        # that never reads its answer (a scrape of every worker) must not hold a slot either.
        if request is None:
            return
        status, content_type, body = await self._route(request)
        await _respond(stream, http, status, content_type,
                       b"" if request.method == b"HEAD" else body, len(body))

    async def _route(self, request: h11.Request) -> tuple[int, str, bytes]:
        if request.method not in (b"GET", b"HEAD"):
            return 405, _TEXT, b"method not allowed\n"
        path = request.target.split(b"?", 1)[0]
        if path == b"/health":
            return 200, _TEXT, b"ok\n"
        if path == b"/ready":
            reason = await self._probe.ready()
            if reason is None:
                return 200, _TEXT, b"ready\n"
            return 503, _TEXT, reason.replace("\n", " ").encode() + b"\n"
        if path == b"/metrics":
            return 200, CONTENT_TYPE_LATEST, await self._probe.metrics()
        return 404, _TEXT, b"not found: try /health, /ready or /metrics\n"


async def _read_request(stream: trio.abc.Stream, http: h11.Connection) -> h11.Request | None:
    while True:
        event = http.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(_MAX_HEAD)
            if not data:
                return None
            http.receive_data(data)
        elif isinstance(event, h11.Request):
            return event
        else:
            return None


async def _respond(stream: trio.abc.Stream, http: h11.Connection, status: int,
                   content_type: str, body: bytes, length: int | None = None) -> None:
    headers = [("content-type", content_type),
               ("content-length", str(len(body) if length is None else length)),
               ("cache-control", "no-store"), ("connection", "close")]
    await stream.send_all(http.send(h11.Response(status_code=status, headers=headers,
                                                 reason=HTTPStatus(status).phrase)))
    if body:
        await stream.send_all(http.send(h11.Data(data=body)))
    await stream.send_all(http.send(h11.EndOfMessage()))


async def open_admin_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """Bind the admin port. Raises OSError if it cannot be bound."""
    return await trio.open_tcp_listeners(port, host=host)


async def open_unix_listener(path: str) -> trio.SocketListener:
    """Bind a worker's private admin socket (mode 0600 through the supervisor's 0700 folder).

    A worker started again after its predecessor died finds that one's socket file: nobody
    else can have made it in the supervisor's private folder, so it is removed first.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        sock.listen(16)
    except OSError:
        sock.close()
        raise
    return trio.SocketListener(sock)


def bound(listeners: Sequence[trio.SocketListener]) -> str:
    """``host:port, …`` of bound TCP listeners, for the log."""
    names = []
    for listener in listeners:
        host, port = listener.socket.getsockname()[:2]
        names.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return ", ".join(names)
