"""Workloads that more than one benchmark runs: the payload size, Econia's channel mix, the
connection plan of N clients over channels, and the burst.

Theory of operation: a burst is ``messages`` notifications sent through PostgreSQL in
transactions of ``batch`` to clients that each expect their channel's share; the clients
(:class:`bench.parts.harness.Clients`, processes of their own) count what arrives and when the
last frame came, and the server's CPU time is read around the burst. Deliveries/s is what all
clients received over the time from the first commit to the last frame. The throughput scenario
(:mod:`bench.scenarios.throughput`) reports it against the peers; c100k's workers goal, the soak
and the resume benchmark run the same burst, so their figures compare with its table.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench.parts.harness import Clients, Producer, Server, token

#: Bytes per payload: an Econia fill_event envelope, padded to one size for every channel.
PAYLOAD = 340
#: Econia's mix: per matched trade about 2 fill_event + 2 updated_limit_order, plus the rest.
ECONIA_MIX = (["fill_event"] * 4 + ["updated_limit_order"] * 4 + ["place_limit_order_event"] * 2
              + ["place_market_order_event", "change_order_size_event", "cancel_order_event",
                 "place_swap_order_event", "market_registration_event",
                 "recognized_market_event"])


def connections_for(channels: list[str], clients: int, roles: Callable[[int], str],
                 messages: int | None) -> list[tuple[str, str, int | None]]:
    """Client i reads channel i mod len(channels) and expects that channel's share of
    ``messages`` sent round-robin over ``channels`` (None: read until stopped)."""
    read = token({"mode": "r"})
    share: dict[str, int] = {}
    for n in range(messages or 0):
        share[channels[n % len(channels)]] = share.get(channels[n % len(channels)], 0) + 1
    return [(f"/{channels[i % len(channels)]}/{read}", roles(i),
             share.get(channels[i % len(channels)], 0) if messages is not None else None)
            for i in range(clients)]


def burst_through(server: Server, conns: list[tuple[str, str, int | None]],
                   channels: list[str], messages: int, batch: int, procs: int,
                   nice: int = 0) -> dict[str, Any]:
    """Send ``messages`` in transactions of ``batch`` to these connections; what came back.
    ``nice``: the client processes' niceness (c100k's workers goal uses 19)."""
    pool = Clients(server.port, conns, PAYLOAD, procs=procs, nice=nice)
    producer = Producer()
    try:
        cpu = server.cpu_seconds()
        pool.start()
        start = time.time()
        producer.burst(channels, messages, batch, PAYLOAD)
        outcomes = pool.results()
        cpu = server.cpu_seconds() - cpu
    finally:
        producer.close()
        pool.close()
    received = sum(o["received"] for o in outcomes)
    return {"received": received, "seconds": max(o["last"] for o in outcomes) - start,
            "cpu_ms_per_1000": 1e6 * cpu / max(received, 1),
            "stalled_closed": sum(o["stalled_closed"] for o in outcomes)}


def burst(server: Server, clients: int, messages: int, batch: int, procs: int, nice: int = 0
          ) -> dict[str, Any]:
    channels = ["fill_event"]
    conns = connections_for(channels, clients, lambda i: "count", messages)
    run = burst_through(server, conns, channels, messages, batch, procs, nice)
    return {"deliveries_per_s": run["received"] / run["seconds"],
            "delivered_share": run["received"] / (clients * messages),
            "cpu_ms_per_1000": run["cpu_ms_per_1000"], "seconds": run["seconds"],
            "peak_rss_kib": server.memory_kib("VmHWM")}


