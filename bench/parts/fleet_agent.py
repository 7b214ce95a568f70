"""The fleet's load clients: N resuming subscriptions (:mod:`relay.client.subscription`) in one
process,
run inside the clients' namespace of a :class:`bench.parts.fleet_hosts.Fleet`, driven over
stdin/stdout.

    python -m bench.parts.fleet_agent URL TOKEN CLIENTS

Theory of operation
-------------------
Every client subscribes to ``URL`` (through the balancer) and records, for each message, its
``seq`` (the producer numbers them) and the wall-clock time it arrived (``time.time()``, which
every process of the machine shares, so the producer's commit times compare with it). A
watcher per client records when each of its connections after the first came up.

The driver speaks JSON lines. The agent writes ``{"event": "ready"}`` once every client has
received a message. Then it answers each command on stdin with one line:

``{"cmd": "wait", "seq": S, "timeout": T}``
    ``{"event": "waited", "missing": [client ids]}`` once every client has received ``seq`` S
    or later (or T seconds passed; the ids are those that had not).
``{"cmd": "report", "last": L, "faults": [{"name", "time", "first"}...]}``
    Waits (as above) for ``L``, then ``{"event": "report", ...}``: per fault, the clients
    that reconnected within :data:`AFFECTED_WINDOW` of it (affected), and for every client
    the time from the fault to the arrival of ``first`` (the first seq committed after it):
    "receives again"; over the whole run, each client's missing and duplicated seqs from its
    first message to ``L``, the seqs that arrived after a later one (out of order), and its
    Lost events. The agent then exits.

It measures and never judges: the driver compares the figures with the goals.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

import orjson
import trio

from relay.client.subscription import Lost, Message, subscribe

#: Seconds after a fault within which a new connection counts as caused by it.
AFFECTED_WINDOW = 20.0


class Client:
    def __init__(self, ident: int) -> None:
        self.ident = ident
        self.arrivals: dict[int, float] = {}
        self.duplicates = 0
        #: Messages that arrived after a later one (a duplicate is not counted here).
        self.out_of_order = 0
        self.lost: list[tuple[float, str]] = []
        self.reconnects: list[float] = []
        self.highest = -1
        self.changed = trio.Event()
        #: The first few duplicates and late arrivals: (kind, seq, highest so far, time,
        #: the connection it came on, the position it came with).
        self.anomalies: list[tuple[str, int, int, float, int, str | None]] = []
        self.connection = 1
        self.position: str | None = None

    def record(self, seq: int, now: float) -> None:
        if seq in self.arrivals:
            self.duplicates += 1
            self._note("duplicate", seq, now)
            return
        if seq < self.highest:
            self.out_of_order += 1
            self._note("late", seq, now)
        self.arrivals[seq] = now
        if seq > self.highest:
            self.highest = seq
            self.changed.set()
            self.changed = trio.Event()

    def _note(self, kind: str, seq: int, now: float) -> None:
        if len(self.anomalies) < 3:
            self.anomalies.append((kind, seq, self.highest, now, self.connection,
                                   self.position))


async def _run_client(client: Client, url: str, token: str) -> None:
    async with subscribe(url, token=token, ping_interval=5.0, ping_timeout=5.0) as subscription:
        async def watch() -> None:
            count = 2
            while True:
                await subscription.wait_connected(count)
                client.reconnects.append(time.time())
                count = subscription.connections + 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            async for event in subscription:
                if isinstance(event, Message):
                    client.connection = subscription.connections
                    client.position = event.position
                    client.record(orjson.loads(event.payload)["seq"], time.time())
                elif isinstance(event, Lost):
                    client.lost.append((time.time(), event.reason))


async def _wait_for(clients: list[Client], seq: int, timeout: float) -> list[int]:
    with trio.move_on_after(timeout):
        for client in clients:
            while client.highest < seq:
                await client.changed.wait()
    return [client.ident for client in clients if client.highest < seq]


def _summary(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"min": None, "median": None, "max": None}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def report(clients: list[Client], last: int, faults: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of the run; see the module's docstring."""
    missing, gaps = 0, []
    for client in clients:
        first = min(client.arrivals) if client.arrivals else last + 1
        absent = [seq for seq in range(first, last + 1) if seq not in client.arrivals]
        missing += len(absent)
        if absent:
            gaps.append({"client": client.ident, "first": first, "absent": absent[:20]})
    out: dict[str, Any] = {
        "clients": len(clients), "missing": missing, "gaps": gaps[:10],
        "duplicated": sum(client.duplicates for client in clients),
        "out_of_order": sum(client.out_of_order for client in clients),
        "lost_events": sum(len(client.lost) for client in clients),
        "lost_reasons": sorted({reason for client in clients for _, reason in client.lost}),
        "anomalies": [(client.ident, *anomaly) for client in clients
                      for anomaly in client.anomalies][:30],
        "faults": []}
    for fault in faults:
        start, first = fault["time"], fault["first"]
        affected = [client for client in clients
                    if any(start <= t <= start + AFFECTED_WINDOW for t in client.reconnects)]
        again = {client.ident: client.arrivals[first] - start for client in clients
                 if first in client.arrivals}
        reconnect = [min(t for t in client.reconnects if t >= start) - start
                     for client in affected]
        out["faults"].append({
            "name": fault["name"], "affected": len(affected),
            "never_received_again": len(clients) - len(again),
            "receives_again_s": {"all": _summary(list(again.values())),
                                 "affected": _summary([again[client.ident] for client in affected
                                                       if client.ident in again])},
            "reconnected_after_s": _summary(reconnect)})
    return out


async def main(url: str, token: str, count: int) -> None:
    clients = [Client(ident) for ident in range(count)]
    stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
    async with trio.open_nursery() as nursery:
        for client in clients:
            nursery.start_soon(_run_client, client, url, token)
        await _wait_for(clients, 0, 1e9)
        print(json.dumps({"event": "ready"}), flush=True)
        buffer = b""
        while True:
            while b"\n" not in buffer:
                data = await stdin.receive_some()
                if not data:
                    nursery.cancel_scope.cancel()
                    return
                buffer += data
            line, buffer = buffer.split(b"\n", 1)
            command = json.loads(line)
            if command["cmd"] == "wait":
                late = await _wait_for(clients, command["seq"], command["timeout"])
                print(json.dumps({"event": "waited", "missing": late}), flush=True)
            elif command["cmd"] == "report":
                late = await _wait_for(clients, command["last"], command.get("timeout", 30))
                result = report(clients, command["last"], command["faults"])
                result["late_at_end"] = late
                print(json.dumps({"event": "report", **result}), flush=True)
                nursery.cancel_scope.cancel()
                return


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]))
