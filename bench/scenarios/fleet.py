"""A fleet on one database, with real faults: how long until every affected client receives
again, and what was lost or duplicated.

    sudo python -m bench.scenarios.fleet --json bench/results/fleet.json [--runs 3] [--clients 300]

Theory of operation
-------------------
:class:`bench.parts.fleet_hosts.Fleet` builds three relay hosts, a private PostgreSQL, HAProxy and a
clients' host, each a network namespace of this process. A producer thread here commits one
notification at a time, ``{"channel": "fleet", "seq": N}``, at ``--rate`` per second for the
whole run, and notes each commit's time. For each fault, a fresh set of load clients
(:mod:`bench.parts.fleet_agent`: resuming subscriptions of :mod:`relay.client.subscription`)
connects through the balancer, which spreads them over the relays; the fault hits the relay holding
the most sessions:

``kill``       SIGKILL of the relay process (the host stays; its sockets are closed by the
               kernel).
``stop``       SIGTERM: the relay drains (``/ready`` 503, no new clients, close 1001).
``partition``  every cable of the host down at the switch: nobody is told.
``database``   the host's database cable down; its clients stay connected to it.
``reload``     HAProxy's master-worker reload (no relay is hit).

The figures per fault: the clients that reconnected (affected); for each client, the seconds
from the start of the fault until it receives the first notification committed once the fault
has taken effect ("receives again"; replayed or live); the reconnects' spread; messages
missing or duplicated from each client's first message to the end. Then what the operator
saw: HAProxy's view, the hit relay's ``/ready``, its log lines and the others' resume
counters. The host is then restored
and the next fault starts from a healthy fleet. Goal: every affected client receives again
within 5 s of the fault, 0 lost, 0 duplicated.

Needs root, ``haproxy`` and ``curl`` (Debian's packages) and Debian's PostgreSQL; leaves
nothing behind (namespaces, processes, the cluster), even when stopped.
"""

from __future__ import annotations

import argparse
import bisect
import json
import queue
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jwt
import psycopg

from bench.parts.fleet_hosts import CHANNEL, LISTEN_CHANNEL, SECRET, WAIT, Fleet, fleet
from bench.parts.netns import exit_on_signals
from bench.parts.paths import module_env

FAULTS = ("kill", "stop", "partition", "database", "reload")
#: Metrics worth showing the operator after a fault.
_METRICS = ("pgws_clients ", "pgws_resumes_total", "pgws_replayed_total",
            "pgws_listener_reconnects_total", "pgws_listener_connected")
#: Log lines of the hit relay and the balancer worth showing: state changes, not traffic.
_LOG_WORDS = ("listener", "ready", "shutting", "closing", "DOWN", "UP", "stopped",
              "Reloading", "worker", "error", "ERROR", "CRITICAL")


def token() -> str:
    return jwt.encode({"mode": "r", "channel": CHANNEL}, SECRET, algorithm="HS256")


class Producer:
    """Commits ``{"channel", "seq"}`` notifications at a fixed rate in a thread; remembers
    when each committed."""

    def __init__(self, uri: str, rate: float) -> None:
        self.uri = uri
        self.rate = rate
        self.committed: list[float] = []  # commit time of seq i at index i
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def start(self) -> Producer:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            with psycopg.connect(self.uri, autocommit=True) as conn:
                start = time.monotonic()
                while not self._stop.is_set():
                    seq = len(self.committed)
                    conn.execute("SELECT pg_notify(%s, %s)", (
                        LISTEN_CHANNEL, json.dumps({"channel": CHANNEL, "seq": seq})))
                    self.committed.append(time.time())
                    delay = start + (seq + 1) / self.rate - time.monotonic()
                    if delay > 0:
                        self._stop.wait(delay)
        except BaseException as error:  # The driver checks and reports it.
            self.error = error

    @property
    def last(self) -> int:
        return len(self.committed) - 1

    def first_after(self, moment: float) -> int:
        """The first seq committed after ``moment`` (waits for it)."""
        deadline = time.monotonic() + WAIT
        while not self.committed or self.committed[-1] <= moment:
            if self.error is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the producer stopped: {self.error}")
            time.sleep(0.01)
        return bisect.bisect_right(self.committed, moment)

    def wait_for(self, count: int) -> None:
        """Until ``count`` more notifications have been committed."""
        target = len(self.committed) + count
        deadline = time.monotonic() + WAIT
        while len(self.committed) < target:
            if self.error is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the producer stopped: {self.error}")
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


class Agent:
    """One :mod:`bench.parts.fleet_agent` process in the clients' host, and its JSON lines."""

    def __init__(self, hosts: Fleet, clients: int) -> None:
        self.process = subprocess.Popen(
            hosts.client_command(hosts.url(), token(), str(clients)), env=module_env(),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put("")

    def expect(self, event: str, timeout: float = WAIT) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"the clients did not say {event!r} within {timeout:g} s"
                               ) from None
        if not line:
            raise RuntimeError(f"the clients exited ({self.process.wait()}) before {event!r}")
        answer: dict[str, Any] = json.loads(line)
        if answer["event"] != event:
            raise RuntimeError(f"the clients said {answer} where {event!r} was expected")
        return answer

    def send(self, **command: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


def _spread(hosts: Fleet, clients: int) -> dict[str, int]:
    """Wait until the balancer holds every client's session; the sessions per relay."""
    deadline = time.monotonic() + WAIT
    while True:
        sessions = {name: count for name, (_, count) in hosts.balancer().items()}
        if sum(sessions.values()) >= clients or time.monotonic() > deadline:
            return sessions
        time.sleep(0.05)


def _resumes(hosts: Fleet) -> dict[str, float]:
    """Each answering relay's count of resumes that succeeded."""
    key = 'pgws_resumes_total{outcome="resumed"}'
    counts = {host: hosts.metrics(int(host[1:]), ("pgws_resumes_total",)) for host in hosts.hosts}
    return {host: samples[key] for host, samples in counts.items() if key in samples}


class _DownWatch:
    """Polls HAProxy from the fault on, in a thread: when it first marks relay ``name`` down."""

    def __init__(self, hosts: Fleet, name: str, moment: float, timeout: float = 10.0) -> None:
        self.seconds: float | None = None
        self._thread = threading.Thread(target=self._run, args=(hosts, name, moment, timeout),
                                        daemon=True)
        self._thread.start()

    def _run(self, hosts: Fleet, name: str, moment: float, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if hosts.balancer().get(name, ("",))[0].startswith(("DOWN", "MAINT")):
                self.seconds = time.time() - moment
                return
            time.sleep(0.02)

    def result(self) -> float | None:
        """Seconds from the fault to "down" (None: not within the timeout)."""
        self._thread.join()
        return self.seconds


def _apply(hosts: Fleet, fault: str, index: int) -> None:
    if fault == "kill":
        hosts.kill(index)
    elif fault == "stop":
        hosts.stop(index)
    elif fault == "partition":
        hosts.link(index, "all", up=False)
    elif fault == "database":
        hosts.link(index, "back", up=False)
    elif fault == "reload":
        hosts.reload()


def _restore(hosts: Fleet, fault: str, index: int) -> None:
    if fault in ("kill", "stop"):
        hosts.start(index)
    elif fault == "partition":
        hosts.link(index, "all", up=True)
    elif fault == "database":
        hosts.link(index, "back", up=True)
    deadline = time.monotonic() + WAIT
    while not all(status == "UP" for status, _ in hosts.balancer().values()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the fleet did not recover from {fault}")
        time.sleep(0.05)


def run_fault(hosts: Fleet, producer: Producer, fault: str, clients: int) -> dict[str, Any]:
    """One fault with a fresh set of clients; its figures and what the operator saw."""
    agent = Agent(hosts, clients)
    try:
        agent.expect("ready")
        before = _spread(hosts, clients)
        producer.wait_for(int(producer.rate))  # A second of steady traffic first.
        name = max(before, key=before.__getitem__)
        index = int(name[1:])
        offsets = {role: hosts.log_size(role) for role in (name, "haproxy")}
        counted = _resumes(hosts)
        moment = time.time()
        watch = _DownWatch(hosts, name, moment) if fault != "reload" else None
        _apply(hosts, fault, index)
        # The first notification committed once the fault has taken effect: one committed
        # while the fault was being applied (a link going down takes a few milliseconds) may
        # still reach the host's clients by the old path. Times count from ``moment``.
        first = producer.first_after(time.time())
        agent.send(cmd="wait", seq=first, timeout=WAIT)
        waited = agent.expect("waited", WAIT + 10)
        seen = {"marked_down_s": watch.result() if watch else None,
                "balancer": hosts.balancer(),
                "ready": hosts.ready(index),
                "resumed": {host: count - counted.get(host, 0)
                            for host, count in _resumes(hosts).items()},
                "metrics": {host: hosts.metrics(int(host[1:]), _METRICS)
                            for host in hosts.hosts},
                "log": [line for role, offset in offsets.items()
                        for line in hosts.log_lines(role, offset)
                        if any(word in line for word in _LOG_WORDS)][:40]}
        _restore(hosts, fault, index)
        agent.send(cmd="report", last=producer.last, faults=[
            {"name": fault, "time": moment, "first": first}])
        result = agent.expect("report", WAIT + 10)
        # Every resume of the run, the restore's included (a client reconnecting again then
        # counts as affected): a restarted relay counts from 0.
        seen["resumed_by_end"] = {host: count - counted.get(host, 0)
                                  if count >= counted.get(host, 0) else count
                                  for host, count in _resumes(hosts).items()}
    finally:
        agent.close()
    figures = result["faults"][0]
    return {"fault": fault, "host": name, "sessions_before": before,
            "clients": clients, "affected": figures["affected"],
            "receives_again_s": figures["receives_again_s"],
            "reconnected_after_s": figures["reconnected_after_s"],
            "never_received_again": max(figures["never_received_again"],
                                        len(waited["missing"])),
            "missing": result["missing"], "duplicated": result["duplicated"],
            "lost_events": result["lost_events"], "lost_reasons": result["lost_reasons"],
            "gaps": result["gaps"], "operator": seen}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per fault, over the runs: the worst client's time to receive again, its median, and
    the totals lost and duplicated."""
    out = {}
    for fault in FAULTS:
        rows = [row for row in runs if row["fault"] == fault]
        if not rows:
            continue
        worst = [row["receives_again_s"]["all"]["max"] for row in rows
                 if row["receives_again_s"]["all"]["max"] is not None]
        out[fault] = {
            "runs": len(rows), "affected_median": _median([row["affected"] for row in rows]),
            "receives_again_worst_s_median": _median(worst),
            "receives_again_worst_s_max": max(worst) if worst else None,
            "missing": sum(row["missing"] for row in rows),
            "duplicated": sum(row["duplicated"] for row in rows),
            "never_received_again": sum(row["never_received_again"] for row in rows),
            "lost_events": sum(row["lost_events"] for row in rows)}
    return out


#: The goal: every affected client receives again within this many seconds of the fault.
GOAL_SECONDS = 5.0

_LABELS = {"kill": "relay host killed (SIGKILL)",
           "stop": "relay host stopped (SIGTERM: drain, close 1001)",
           "partition": "relay host cut off (every cable down)",
           "database": "relay host's database cable cut (its clients stay connected)",
           "reload": "HAProxy reloaded (master-worker, SIGUSR2)"}


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f} s"


def section(result: dict[str, Any], directory: Path) -> list[str]:
    """bench/RESULTS.md's section for ``results/fleet.json`` (in ``directory``): each fault's
    figures beside the goal, what the operator saw, and the chart."""
    summary = result["summary"]
    lines = ["## Goals: a fleet on one database, with real faults", "",
             f"`{result['command']}` (run {result['started']}): {result['relays']} relay hosts "
             f"behind HAProxy (`deploy/haproxy.cfg`), a private PostgreSQL, {result['clients']} "
             f"resuming clients (`relay.client.subscription`) made afresh for each fault, "
             f"{result['rate']:g} notifications/s throughout. Each fault hits the relay holding "
             "the most sessions; \"receives again\" is the time from the start of the fault "
             "until a client has the first notification committed once the fault took effect "
             "(replayed or live); the worst client is an affected one.", "",
             "| fault | affected clients (median) | receives again, worst client (median of "
             "runs; max) | lost / duplicated / Lost events | goal | status |",
             "|---|---|---|---|---|---|"]
    for fault, row in summary.items():
        clean = not (row["missing"] or row["duplicated"] or row["lost_events"]
                     or row["never_received_again"])
        worst = row["receives_again_worst_s_max"]
        met = clean and worst is not None and worst <= GOAL_SECONDS
        lines.append(
            f"| {_LABELS.get(fault, fault)} | {row['affected_median']:g} | "
            f"{_seconds(row['receives_again_worst_s_median'])}; {_seconds(worst)} | "
            f"{row['missing']} / {row['duplicated']} / {row['lost_events']} | "
            f"≤ {GOAL_SECONDS:g} s, 0 / 0 / 0 | {'met' if met else 'missed'} |")
    lines += ["", "What the operator saw (first run of each fault, just after every client "
              "received again):", ""]
    for fault in summary:
        row = next(run for run in result["runs"] if run["fault"] == fault)
        seen = row["operator"]
        status = seen["balancer"].get(row["host"], ["?"])[0]
        code, body = seen["ready"]
        ready = f"{code} {body}" if code else "no answer"
        resumed = sum(seen["resumed"].values())
        spread = row["reconnected_after_s"]
        down = seen["marked_down_s"]
        lines.append(
            f"- {fault}: " + (f"HAProxy marked {row['host']} down {_seconds(down)} after the "
                              "fault; " if down is not None else
                              f"HAProxy had {row['host']} `{status}`; ")
            + f"its `/ready`: {ready}; the relays counted {resumed:g} resumes "
            "(`pgws_resumes_total{outcome=\"resumed\"}`); "
            + (f"reconnects {_seconds(spread['min'])}–{_seconds(spread['max'])} after the "
               f"fault (median {_seconds(spread['median'])}); " if spread["median"] is not None
               else "no client reconnected; ")
            + ("log: " + " · ".join(f"`{_log_text(line)}`" for line in seen["log"][:3])
               if seen["log"] else "no log line"))
    picture = chart(result, directory)
    return [*lines, "", f"![fleet.png]({picture})", ""]


def chart(result: dict[str, Any], directory: Path) -> str:
    """``fleet.png``: per fault, the affected clients' time to receive again (median and worst
    client of each run) beside the goal; the file name, relative to ``directory``'s parent."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 3.6))
    faults = list(result["summary"])
    for position, fault in enumerate(faults):
        runs = [run for run in result["runs"] if run["fault"] == fault]
        for run in runs:
            figures = run["receives_again_s"]["affected" if run["affected"] else "all"]
            axes.plot([position - 0.1], [figures["median"]], "o", color="tab:blue",
                      label="median client (each run)" if position == run["run"] == 0 else None)
            axes.plot([position + 0.1], [figures["max"]], "s", color="tab:red",
                      label="worst client (each run)" if position == run["run"] == 0 else None)
    axes.axhline(GOAL_SECONDS, color="grey", linestyle="--", label=f"goal {GOAL_SECONDS:g} s")
    axes.set_xticks(range(len(faults)), faults)
    axes.set_ylabel("seconds until receiving again")
    axes.set_title(f"Faults in a fleet of {result['relays']} relays behind HAProxy "
                   f"({result['clients']} resuming clients)")
    axes.set_ylim(0, GOAL_SECONDS * 1.2)
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(directory / "fleet.png", dpi=110)
    plt.close(figure)
    return f"{directory.name}/fleet.png"


def _log_text(line: str) -> str:
    """A log line without its timestamp and HAProxy's pid, shortened."""
    text = re.sub(r"^\S+ \S+ |^\[\w+\]\s+\(\d+\) : ", "", line.strip())
    return text if len(text) <= 110 else text[:107] + "..."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--relays", type=int, default=3)
    parser.add_argument("--clients", type=int, default=300)
    # 300 clients in one process read 6,000 messages/s at 20/s: well within its core, so
    # that the clients' own lag does not pass for the relays'.
    parser.add_argument("--rate", type=float, default=20.0, help="notifications per second")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    faults = [name for name in args.faults.split(",") if name]
    unknown = set(faults) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults: {', '.join(sorted(unknown))}")
    runs = []
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    with exit_on_signals(), fleet(args.relays) as hosts:
        producer = Producer(hosts.database_uri(), args.rate).start()
        try:
            for run in range(args.runs):
                for fault in faults:
                    row = run_fault(hosts, producer, fault, args.clients)
                    row["run"] = run
                    runs.append(row)
                    again = row["receives_again_s"]["all"]["max"]
                    print(f"{fault:<9} run {run}: {row['affected']:>4} affected; all receive "
                          f"again within {again if again is None else round(again, 3)} s; "
                          f"missing {row['missing']}, duplicated {row['duplicated']}, "
                          f"lost events {row['lost_events']}", flush=True)
        finally:
            producer.stop()
    result = {"benchmark": "fleet", "started": started, "relays": args.relays,
              "clients": args.clients, "rate": args.rate,
              "command": "python -m bench.scenarios.fleet " + " ".join(argv or sys.argv[1:]),
              "summary": summarise(runs), "runs": runs}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
