"""Abuse: what one read token can make the relay spend, before and after the security fixes.

    python -m bench.scenarios.abuse --before ../m-before --json bench/results/abuse.json
    python -m bench.scenarios.abuse --parts filters --runs 1      # this checkout alone
    python -m bench.scenarios.abuse --parts burst --before ../m-before --burst-rounds 5

``--before DIR`` names a checkout of the older commit with its own ``.venv`` and a copy of this
file at ``DIR/bench/scenarios/abuse.py``: parts ``filters`` and ``resume`` then run there too
(``DIR/.venv/bin/python -m bench.scenarios.abuse --parts P --runs 1 --json TMP``, from ``DIR``,
one run at a time, interleaved with this checkout's runs), and part ``burst`` runs each
checkout's own throughput scenario. Without it only this checkout is measured (``burst``
needs it). The script imports nothing the older layout lacks: the harness is
``bench.parts.harness`` or, in the flat layout, ``bench.harness``; relay settings the
checkout's ``relay.config`` does not know are not passed to its relay.

Theory of operation
-------------------
Every part starts a fresh ``pgws-relay`` of the checkout it runs from (the harness's
``OwnedServer``, default settings unless said) on one database and a listen channel of its own,
and talks to it over loopback with plain sockets (a small WebSocket client here: handshake,
unmasked server frames, no extension). The attacker's filter set is 32 ``neq`` filters (the
most a set may have) on 16-segment paths, ``payload.k0.….k13.p<j>=neq.<n>``, ``n`` unique per
set and never equal to the payload's values, so every filter is evaluated and holds; the
notifications carry exactly those paths with the value 1.5 (a float: the exact-number path,
the costliest).

1. ``filters``: one reader without filters on channel ``c`` counts deliveries. Baseline:
   ``--notifications`` (300) notifications on ``c`` (100 per transaction); the relay's CPU
   (utime + stime from /proc, as ``bench.scenarios.filters``) from the first statement until
   the reader has all of them and every attacker connection has its share (their sockets are
   drained by a thread here, so the relay never sees a slow reader). Then the attacker opens
   connections on ``c`` from 127.0.0.1, one distinct set each, until the relay answers
   anything but 101 (503 at its limits) or ``--sets`` (1,000) are open
   (``PGWS_MAX_FILTER_SETS_PER_IP=0`` where the relay knows it, so one address may play the
   attacker), and the same notifications again. The figure: (attack CPU − baseline CPU) /
   notifications, in ms of relay CPU per notification of the attacked channel; it includes
   the writes to the attacker's own connections (they match, as the attacker chose).
2. ``resume``: ``PGWS_HISTORY_MESSAGES=1000`` (and ``PGWS_MAX_RESUMES_PER_SECOND_PER_IP=0``
   where known). A client offering ``pgws.resume.v1`` takes its first ``position`` event and
   leaves; 1,000 notifications follow on ``c`` (a plain reader waits for them). A prober
   process sends ``GET /`` on a new connection every ``--probe-interval`` (10 ms) and times
   each answer (connect to end of the response): ``--rest`` (5 s) at rest, then
   ``--resume-seconds`` (10 s) during which a resume starts every 1 / ``--resume-rate``
   (5/s) s, each in its own thread: ``/c/TOKEN?from=P`` with the attacker's 32 filters,
   reading the first control event (``resumed`` with the count replayed, or ``lost`` with the
   reason) and then the replayed frames. A resume that got either event was served; other
   answers (429, an error) are counted apart. The figures: ``GET /`` p50/p99/max at rest and
   during the resumes; the max during is the proxy for the longest single loop stall (the
   relay runs one Trio loop; a replay prepared in one synchronous step holds every other
   request for that long).
3. ``burst``: the regression guard, each checkout's own throughput scenario at N = 1,000
   clients, 4,000 notifications, 100 per commit (``burst --servers relay --runs 1 --cases
   "N=1000 B=100"``; ``bench/run.py`` where the checkout predates ``bench/scenarios``),
   ``--burst-rounds`` (5) rounds of before then after; medians of deliveries/s and the ratio
   after / before (of medians, and per round).

Each part's figures are the median of ``--runs`` (3) runs with min and max beside. Run it under
the machine lock (``flock /tmp/machine.lock python -m bench.scenarios.abuse ...``): the script
takes no lock itself, and its children would deadlock on one the parent held.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import multiprocessing as mp
import os
import selectors
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any
from urllib.parse import quote

try:
    from bench.parts import harness
except ImportError:  # the flat bench/ layout of older commits
    from bench import harness  # type: ignore[no-redef]

CHANNEL = "c"
SUBPROTOCOL = "pgws.resume.v1"
FILTERS_PER_SET = 32
DEPTH = 14  # payload + k0..k13 + p<j>: 16 segments, the most a path may have
PARTS = ("filters", "resume", "burst")
GOALS = {"filters_ms_per_notification": 5.0, "resume_get_p99_ms": 50.0,
         "resume_stall_ms": 20.0, "burst_ratio": 0.95}


# -- settings, payloads, filters ----------------------------------------------------------------

def known_settings() -> set[str] | None:
    """The PGWS_ variables this checkout's relay knows (None: cannot tell)."""
    try:
        from relay import config
    except ImportError:
        return None
    return {setting.variable for setting in config.SETTINGS}


def relay_env(wanted: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """``wanted`` less the variables this relay does not know; (env, names left out)."""
    known = known_settings()
    if known is None:
        return dict(wanted), []
    return ({k: v for k, v in wanted.items() if k in known},
            sorted(k for k in wanted if k not in known))


def deep_path(j: int) -> str:
    return "payload." + ".".join(f"k{i}" for i in range(DEPTH)) + f".p{j}"


def filter_query(unique: int) -> str:
    """32 deep ``neq`` filters, distinct for each ``unique``, none ever false."""
    return "&".join("filter=" + quote(f"{deep_path(j)}=neq.{unique * 100 + j + 7}", safe="=.")
                    for j in range(FILTERS_PER_SET))


def deep_text(n: int) -> str:
    """A notification for ``c`` whose payload has the 32 deep paths, each 1.5."""
    leaf = ",".join(f'"p{j}":1.5' for j in range(FILTERS_PER_SET))
    body = "{" + leaf + "}"
    for i in reversed(range(DEPTH)):
        body = f'{{"k{i}":{body}}}'
    return f'{{"channel":"{CHANNEL}","n":{n},"payload":{body}}}'


# -- a small WebSocket client -------------------------------------------------------------------

class Frames:
    """Server frames of one connection: counted; the first ``keep`` texts kept."""

    def __init__(self, keep: int = 0) -> None:
        self.buffer = bytearray()
        self.count = 0
        self.closed = False
        self.keep = keep
        self.texts: list[bytes] = []

    def feed(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        offset = 0
        while len(buf) - offset >= 2:
            b0, b1 = buf[offset], buf[offset + 1]
            size, head = b1 & 0x7F, 2
            if size == 126:
                if len(buf) - offset < 4:
                    break
                size, head = int.from_bytes(buf[offset + 2:offset + 4], "big"), 4
            elif size == 127:
                if len(buf) - offset < 10:
                    break
                size, head = int.from_bytes(buf[offset + 2:offset + 10], "big"), 10
            if len(buf) - offset < head + size:
                break
            opcode = b0 & 0x0F
            if opcode == 0x8:
                self.closed = True
            elif b0 & 0x80 and opcode in (0x0, 0x1, 0x2):
                self.count += 1
                if len(self.texts) < self.keep:
                    self.texts.append(bytes(buf[offset + head:offset + head + size]))
            offset += head + size
        del buf[:offset]


def ws_connect(port: int, path: str, protocol: str | None = None, source: str | None = None,
               timeout: float = 30.0) -> tuple[int, socket.socket | None, bytes]:
    """Upgrade ``path``: (HTTP status, the socket when 101 else None, bytes after the head)."""
    sock = socket.socket()
    try:
        sock.settimeout(timeout)
        if source:
            sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        extra = f"Sec-WebSocket-Protocol: {protocol}\r\n" if protocol else ""
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      f"Sec-WebSocket-Version: 13\r\n{extra}\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            if not chunk:
                return 0, None, b""
            head += chunk
        head, rest = head.split(b"\r\n\r\n", 1)
        status = int(head.split(b" ", 2)[1])
        if status != 101:
            sock.close()
            return status, None, b""
        return 101, sock, rest
    except BaseException:
        sock.close()
        raise


class Drain:
    """A thread reading every given socket, counting frames per socket."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.frames: list[Frames] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def add(self, sock: socket.socket, rest: bytes, keep: int = 0) -> Frames:
        frames = Frames(keep)
        frames.feed(rest)
        sock.setblocking(False)
        with self._lock:
            self.frames.append(frames)
            self.selector.register(sock, selectors.EVENT_READ, frames)
        return frames

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                ready = self.selector.select(timeout=0) if self.selector.get_map() else []
            if not ready:
                time.sleep(0.005)
                continue
            for key, _ in ready:
                try:
                    data = key.fileobj.recv(1 << 18)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    key.data.closed = True
                    with self._lock:
                        self.selector.unregister(key.fileobj)
                    continue
                key.data.feed(data)

    def wait(self, frames: Frames, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while frames.count < count and time.monotonic() < deadline:
            time.sleep(0.005)
        return frames.count >= count

    def wait_all(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(f.count >= count or f.closed for f in self.frames):
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for key in list(self.selector.get_map().values()):
            with contextlib.suppress(OSError):
                key.fileobj.close()  # type: ignore[union-attr]


def _median(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"median": None, "min": None, "max": None, "runs": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": len(values)}


def _quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- part 1: filters ---------------------------------------------------------------------------

def filters_once(args: argparse.Namespace) -> dict[str, Any]:
    env, dropped = relay_env({"PGWS_MAX_FILTER_SETS_PER_IP": "0"})
    harness.raise_nofile()
    texts = [deep_text(n) for n in range(args.notifications)]
    server = harness.OwnedServer("relay", harness.free_port(), env)
    drain = Drain()
    producer = harness.Producer()
    result: dict[str, Any] = {"relay_env": env, "not_known_to_relay": dropped}
    try:
        status, sock, rest = ws_connect(server.port, f"/{CHANNEL}/{harness.token()}")
        if sock is None:
            raise RuntimeError(f"reader refused: {status}")
        reader = drain.add(sock, rest)

        def phase(expected: int) -> dict[str, Any]:
            base = reader.count
            cpu = server.cpu_seconds()
            started = time.monotonic()
            producer.send(texts, 100)
            ok = drain.wait(reader, base + len(texts), args.timeout)
            ok = drain.wait_all(expected, args.timeout) and ok
            seconds = time.monotonic() - started
            cpu = server.cpu_seconds() - cpu
            return {"relay_cpu_s": cpu, "seconds": round(seconds, 3), "complete": ok,
                    "ms_per_notification": 1e3 * cpu / len(texts)}

        result["baseline"] = phase(len(texts))
        refused_with = None
        opened = 0
        started = time.monotonic()
        for number in range(args.sets):
            status, sock, rest = ws_connect(server.port, f"/{CHANNEL}/{harness.token()}?"
                                            + filter_query(number + 1))
            if sock is None:
                refused_with = status
                break
            drain.add(sock, rest)
            opened += 1
        result.update({"sets_accepted": opened, "stopped_by": refused_with or
                       f"the script's limit ({args.sets})",
                       "connect_seconds": round(time.monotonic() - started, 2)})
        result["attack"] = phase(len(texts))
        result["extra_ms_per_notification"] = (result["attack"]["ms_per_notification"]
                                               - result["baseline"]["ms_per_notification"])
        result["attacker_frames"] = sum(f.count for f in drain.frames[1:])
        result["attacker_closed"] = sum(1 for f in drain.frames[1:] if f.closed)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["relay_log_tail"] = server.lines[-10:]
    finally:
        producer.close()
        drain.close()
        server.stop()
    return result


def filters_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in runs if "error" not in r]
    return {"ms_per_notification": _median([r["extra_ms_per_notification"] for r in good]),
            "baseline_ms_per_notification": _median(
                [r["baseline"]["ms_per_notification"] for r in good]),
            "sets_accepted": _median([r["sets_accepted"] for r in good]),
            "stopped_by": sorted({str(r["stopped_by"]) for r in good}),
            "failed_runs": len(runs) - len(good)}


# -- part 2: resume ----------------------------------------------------------------------------

def _probe(port: int, seconds: float, interval: float, out: Any) -> None:
    """GET / on a new connection every ``interval`` s for ``seconds``; (start, latency) pairs."""
    samples: list[tuple[float, float]] = []
    errors = 0
    end = time.time() + seconds
    request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    while time.time() < end:
        start = time.time()
        began = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(request)
                while sock.recv(65536):
                    pass
            samples.append((start, time.perf_counter() - began))
        except OSError:
            errors += 1
        time.sleep(interval)
    out.put({"samples": samples, "errors": errors})


def _latencies(samples: list[tuple[float, float]], start: float, end: float) -> dict[str, Any]:
    ordered = sorted(1e3 * latency for at, latency in samples if start <= at < end)
    return {"probes": len(ordered), "p50_ms": _quantile(ordered, 0.5),
            "p99_ms": _quantile(ordered, 0.99), "max_ms": ordered[-1] if ordered else None}


def _resume(port: int, path: str, out: list[dict[str, Any]], timeout: float) -> None:
    began = time.perf_counter()
    entry: dict[str, Any] = {}
    try:
        status, sock, rest = ws_connect(port, path, protocol=SUBPROTOCOL, timeout=timeout)
        entry["status"] = status
        if sock is None:
            return
        frames = Frames(keep=1)
        frames.feed(rest)
        deadline = time.monotonic() + timeout
        with sock:
            while not frames.texts and not frames.closed and time.monotonic() < deadline:
                data = sock.recv(1 << 18)
                if not data:
                    break
                frames.feed(data)
            entry["answer_ms"] = 1e3 * (time.perf_counter() - began)
            if not frames.texts:
                entry["event"] = "none"
                return
            event = json.loads(frames.texts[0])
            entry["event"] = event.get("event")
            entry["reason"] = event.get("reason")
            entry["replayed"] = event.get("replayed")
            want = 1 + (event.get("replayed") or 0)
            sock.settimeout(1.0)
            while frames.count < want and time.monotonic() < deadline:
                try:
                    data = sock.recv(1 << 18)
                except TimeoutError:
                    break
                if not data:
                    break
                frames.feed(data)
            entry["frames_after_event"] = frames.count - 1
            entry["done_ms"] = 1e3 * (time.perf_counter() - began)
    except Exception as exc:
        entry["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        out.append(entry)


def resume_once(args: argparse.Namespace) -> dict[str, Any]:
    env, dropped = relay_env({"PGWS_HISTORY_MESSAGES": "1000",
                              "PGWS_MAX_RESUMES_PER_SECOND_PER_IP": "0"})
    server = harness.OwnedServer("relay", harness.free_port(), env)
    drain = Drain()
    producer = harness.Producer()
    result: dict[str, Any] = {"relay_env": env, "not_known_to_relay": dropped}
    try:
        status, sock, rest = ws_connect(server.port, f"/{CHANNEL}/{harness.token()}",
                                        protocol=SUBPROTOCOL)
        if sock is None:
            raise RuntimeError(f"positioned client refused: {status}")
        first = drain.add(sock, rest, keep=1)
        deadline = time.monotonic() + 10
        while not first.texts and time.monotonic() < deadline:
            time.sleep(0.01)
        if not first.texts:
            raise RuntimeError("no position event within 10 s")
        position = json.loads(first.texts[0])["position"]
        status, sock, rest = ws_connect(server.port, f"/{CHANNEL}/{harness.token()}")
        if sock is None:
            raise RuntimeError(f"reader refused: {status}")
        reader = drain.add(sock, rest)
        producer.send([deep_text(n) for n in range(args.history)], 100)
        if not drain.wait(reader, args.history, args.timeout):
            raise RuntimeError(f"the reader got {reader.count} of {args.history}")
        drain.close()
        result["position"] = position
        path = f"/{CHANNEL}/{harness.token()}?from={position}&" + filter_query(1)
        queue: Any = mp.get_context("fork").Queue()
        total = args.rest + args.resume_seconds + 1.0
        prober = mp.get_context("fork").Process(
            target=_probe, args=(server.port, total, args.probe_interval, queue), daemon=True)
        probe_start = time.time()
        prober.start()
        time.sleep(args.rest)
        during_start = time.time()
        answers: list[dict[str, Any]] = []
        threads = []
        count = int(args.resume_seconds * args.resume_rate)
        cpu = server.cpu_seconds()
        for number in range(count):
            due = during_start + number / args.resume_rate
            time.sleep(max(0.0, due - time.time()))
            thread = threading.Thread(target=_resume, args=(server.port, path, answers, 30.0),
                                      daemon=True)
            thread.start()
            threads.append(thread)
        during_end = max(time.time(), during_start + args.resume_seconds)
        for thread in threads:
            thread.join(40)
        cpu = server.cpu_seconds() - cpu
        probed = queue.get(timeout=total + 30)
        prober.join(10)
        samples = probed["samples"]
        events: dict[str, int] = {}
        for answer in answers:
            key = (answer.get("event") or f"http {answer.get('status')}") + (
                f":{answer['reason']}" if answer.get("reason") else "")
            if "error" in answer:
                key = "error"
            events[key] = events.get(key, 0) + 1
        served = [a for a in answers if a.get("event") in ("resumed", "lost")]
        result.update({
            "resumes_started": count, "served": len(served), "answers": events,
            "replayed": _median([a["replayed"] for a in served if a.get("replayed") is not None]),
            "answer_ms": _median([a["answer_ms"] for a in served]),
            "relay_cpu_s_during": round(cpu, 3),
            "rest": _latencies(samples, probe_start, during_start),
            "during": _latencies(samples, during_start, during_end),
            "probe_errors": probed["errors"],
            "errors": [a["error"] for a in answers if "error" in a][:5]})
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["relay_log_tail"] = server.lines[-10:]
    finally:
        producer.close()
        drain.close()
        server.stop()
    return result


def resume_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in runs if "error" not in r]
    summary: dict[str, Any] = {"failed_runs": len(runs) - len(good)}
    for phase in ("rest", "during"):
        for key in ("p50_ms", "p99_ms", "max_ms"):
            summary[f"{phase}_{key}"] = _median([r[phase][key] for r in good
                                                 if r[phase][key] is not None])
    summary["served"] = _median([r["served"] for r in good])
    summary["resumes_started"] = _median([r["resumes_started"] for r in good])
    answers: dict[str, int] = {}
    for run in good:
        for key, value in run["answers"].items():
            answers[key] = answers.get(key, 0) + value
    summary["answers_all_runs"] = answers
    return summary


# -- part 3: burst -----------------------------------------------------------------------------

def burst_command(checkout: str, out: str) -> list[str]:
    python = os.path.join(checkout, ".venv", "bin", "python")
    tail = ["burst", "--servers", "relay", "--runs", "1", "--cases", "N=1000 B=100",
            "--json", out]
    if os.path.exists(os.path.join(checkout, "bench", "scenarios", "throughput.py")):
        return [python, "-m", "bench.scenarios.throughput", *tail]
    return [python, "bench/run.py", *tail]


def burst_once(checkout: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pgws-abuse-") as tmp:
        out = os.path.join(tmp, "burst.json")
        command = burst_command(checkout, out)
        done = subprocess.run(command, cwd=checkout, capture_output=True, text=True,
                              timeout=900)
        result: dict[str, Any] = {"command": shlex.join(command), "cwd": checkout}
        try:
            with open(out) as handle:
                document = json.load(handle)
            sample = document["cases"][0]["servers"]["relay"][0]
            result.update({"commit": document.get("commit"), **sample})
        except (OSError, ValueError, KeyError, IndexError) as exc:
            result["error"] = f"{type(exc).__name__}: {exc}: {done.stderr[-500:]}"
        return result


def burst_part(args: argparse.Namespace) -> dict[str, Any]:
    after = os.getcwd()
    rounds: list[dict[str, Any]] = []
    for number in range(args.burst_rounds):
        pair = {"round": number + 1}
        for side, checkout in (("before", args.before), ("after", after)):
            pair[side] = burst_once(checkout)
            value = pair[side].get("deliveries_per_s")
            print(f"burst round {number + 1} {side}: "
                  + (f"{value:,.0f} deliveries/s" if value else pair[side].get("error", "?")),
                  flush=True)
        rounds.append(pair)
    rates = {side: [r[side]["deliveries_per_s"] for r in rounds
                    if "deliveries_per_s" in r[side]] for side in ("before", "after")}
    per_round = [r["after"]["deliveries_per_s"] / r["before"]["deliveries_per_s"]
                 for r in rounds if "deliveries_per_s" in r["before"]
                 and "deliveries_per_s" in r["after"]]
    summary = {side: _median(values) for side, values in rates.items()}
    ratio = (summary["after"]["median"] / summary["before"]["median"]
             if summary["after"]["median"] and summary["before"]["median"] else None)
    return {"summary": {"deliveries_per_s": summary, "ratio_after_before": ratio,
                        "ratio_per_round": _median(per_round)}, "rounds": rounds}


# -- driving -----------------------------------------------------------------------------------

ONCE = {"filters": filters_once, "resume": resume_once}
SUMMARY = {"filters": filters_summary, "resume": resume_summary}


def before_once(args: argparse.Namespace, part: str) -> dict[str, Any]:
    """One run of ``part`` in the ``--before`` checkout (its copy of this script)."""
    with tempfile.TemporaryDirectory(prefix="pgws-abuse-") as tmp:
        out = os.path.join(tmp, "part.json")
        command = [os.path.join(args.before, ".venv", "bin", "python"), "-m",
                   "bench.scenarios.abuse", "--parts", part, "--runs", "1", "--json", out,
                   *args.passthrough]
        done = subprocess.run(command, cwd=args.before, capture_output=True, text=True,
                              timeout=1800)
        try:
            with open(out) as handle:
                document = json.load(handle)
            run = document["parts"][part]["this"]["runs"][0]
            run["commit"] = document.get("commit")
            return run
        except (OSError, ValueError, KeyError, IndexError) as exc:
            return {"error": f"{type(exc).__name__}: {exc}: {done.stderr[-800:]}"}


def _show(part: str, side: str, run: dict[str, Any]) -> str:
    if "error" in run:
        return f"{part} {side}: failed: {run['error']}"
    if part == "filters":
        return (f"{part} {side}: {run['sets_accepted']} sets (stopped by {run['stopped_by']}), "
                f"{run['extra_ms_per_notification']:.2f} ms relay CPU per notification "
                f"(baseline {run['baseline']['ms_per_notification']:.3f} ms)")
    return (f"{part} {side}: served {run['served']}/{run['resumes_started']} {run['answers']}; "
            f"GET / at rest p50 {run['rest']['p50_ms']:.2f} p99 {run['rest']['p99_ms']:.2f} "
            f"max {run['rest']['max_ms']:.2f} ms; during p50 {run['during']['p50_ms']:.2f} "
            f"p99 {run['during']['p99_ms']:.2f} max {run['during']['max_ms']:.2f} ms")


def goals(parts: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []

    def status(value: float | None, limit: float, above: bool = False) -> str:
        if value is None:
            return "not measured"
        return "met" if (value >= limit if above else value <= limit) else "missed"

    if "filters" in parts:
        for side in parts["filters"]:
            value = parts["filters"].get(side, {}).get("summary", {}).get(
                "ms_per_notification", {}).get("median")
            rows.append({"part": "filters", "side": side, "measure": "relay CPU per "
                         "notification of the attacked channel, ms", "value": value,
                         "goal": "≤ 5", "status": status(value, 5.0)})
    if "resume" in parts:
        for side in parts["resume"]:
            summary = parts["resume"].get(side, {}).get("summary", {})
            p99 = summary.get("during_p99_ms", {}).get("median")
            stall = summary.get("during_max_ms", {}).get("median")
            rows.append({"part": "resume", "side": side, "measure": "GET / p99 during 5 "
                         "filtered 1,000-entry resumes/s, ms", "value": p99, "goal": "< 50",
                         "status": status(p99, 50.0)})
            rows.append({"part": "resume", "side": side, "measure": "longest stall (GET / "
                         "max during the resumes), ms", "value": stall, "goal": "≤ 20",
                         "status": status(stall, 20.0)})
    if "burst" in parts:
        ratio = parts["burst"]["summary"]["ratio_after_before"]
        rows.append({"part": "burst", "side": "after / before", "measure": "deliveries/s at "
                     "N = 1,000, ratio of medians", "value": ratio, "goal": "≥ 0.95",
                     "status": status(ratio, 0.95, above=True)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scenarios.abuse",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help="of " + ",".join(PARTS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--before", help="a checkout of the older commit (its .venv, and this "
                                         "file copied to bench/scenarios/abuse.py)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--notifications", type=int, default=300)
    parser.add_argument("--sets", type=int, default=1000)
    parser.add_argument("--history", type=int, default=1000)
    parser.add_argument("--rest", type=float, default=5.0)
    parser.add_argument("--resume-seconds", type=float, default=10.0)
    parser.add_argument("--resume-rate", type=float, default=5.0)
    parser.add_argument("--probe-interval", type=float, default=0.01)
    parser.add_argument("--burst-rounds", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    args.passthrough = ["--notifications", str(args.notifications), "--sets", str(args.sets),
                        "--history", str(args.history), "--rest", str(args.rest),
                        "--resume-seconds", str(args.resume_seconds), "--resume-rate",
                        str(args.resume_rate), "--probe-interval", str(args.probe_interval),
                        "--timeout", str(args.timeout)]
    if args.before:
        args.before = os.path.abspath(args.before)
    chosen = [p.strip() for p in args.parts.split(",") if p.strip()]
    for part in chosen:
        if part not in PARTS:
            raise SystemExit(f"unknown part {part!r}; known: {', '.join(PARTS)}")
    if "burst" in chosen and not args.before:
        raise SystemExit("part burst needs --before DIR")
    document: dict[str, Any] = {
        "what": "abuse: what one read token makes the relay spend (filters: CPU per "
                "notification; resume: GET / latency during filtered resumes; burst: the "
                "regression guard)",
        "command": "python -m bench.scenarios.abuse " + shlex.join(sys.argv[1:]),
        "commit": harness.commit(), "machine": harness.machine(),
        "started": time.strftime("%F %T"), "runs": args.runs, "goals_set": GOALS,
        "parts": {}}
    if args.before:
        document["before_checkout"] = args.before
    for part in chosen:
        if part == "burst":
            document["parts"]["burst"] = burst_part(args)
            continue
        sides: dict[str, list[dict[str, Any]]] = {"this": []}
        if args.before:
            sides = {"before": [], "after": []}
        for number in range(args.runs):
            for side, runs in sides.items():
                run = before_once(args, part) if side == "before" else ONCE[part](args)
                run["run"] = number + 1
                runs.append(run)
                print(_show(part, side, run), flush=True)
        document["parts"][part] = {side: {"summary": SUMMARY[part](runs), "runs": runs}
                                   for side, runs in sides.items()}
    document["goals"] = goals(document["parts"])
    document["finished"] = time.strftime("%F %T")
    for row in document["goals"]:
        value = row["value"]
        print(f"{row['part']:8} {row['side']:15} {row['measure']}: "
              f"{'–' if value is None else f'{value:,.3f}'} (goal {row['goal']}): "
              f"{row['status']}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(document, handle, indent=1)
            handle.write("\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
