"""Fault figures: how soon delivery resumes after database faults, and shutdown under load.

    python -m bench.reliability.faults --runs 3 --json bench/results/faults.json

Needs a local PostgreSQL cluster it may stop and start (``pg_ctlcluster``), like the tests in
``tests/test_faults.py`` that prove the behaviour; this script measures it. Cases:

- ``kill``: the LISTEN backend killed (``pg_terminate_backend``); from the kill to the first
  notification a connected client receives (the database accepts connections throughout).
- ``restart``: PostgreSQL stopped and started (``pg_ctlcluster stop``/``start``); from the
  moment the database accepts connections again to the first delivery.
- ``down-at-start``: the relay started while PostgreSQL is down, which stays down for 5 s (longer
  than the first retry); from the database accepting connections to the first delivery.
- ``sigterm``: SIGTERM with 1,000 connected clients that answer the close, as client libraries
  do; seconds to exit, exit status, and how many clients got close 1001. ``sigterm-silent``:
  the same with clients that never answer, so the relay waits ``PGWS_SHUTDOWN_TIMEOUT``.

In every database case a client stays connected throughout, and a producer sends a NOTIFY every
20 ms once the database accepts connections; the gap counter is read from the relay's
``stats:`` line. Medians of ``--runs``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import selectors
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from bench.parts.harness import (
    DB_URI,
    LISTEN,
    Server,
    commit,
    dumps,
    frame,
    free_port,
    handshake,
    machine,
    recv_ready,
    token,
)

#: How often the producer tries while waiting for delivery to resume: the figures' resolution.
_PROBE_INTERVAL = 0.02
_DOWN_AT_START = 5.0
_SIGTERM_CLIENTS = 1000
_PATH = f"/faults/{token({'mode': 'r'})}"


def _cluster() -> list[str]:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    return ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main"]


def _postgres(action: str, check: bool = True) -> None:
    """``check=False``: for making sure it runs (``start`` on a running cluster fails)."""
    subprocess.run([*_cluster(), action], check=check, timeout=120, capture_output=True)


def _accepting_after(action: Callable[[], None]) -> tuple[float, threading.Thread]:
    """Run ``action`` (which brings the database up) in a thread; the time.monotonic() at which
    a connection first succeeds, polled every 10 ms, and the thread, to join later (the
    command returns well after the server accepts connections)."""
    thread = threading.Thread(target=action)
    thread.start()
    while True:
        try:
            with psycopg.connect(DB_URI, connect_timeout=2):
                return time.monotonic(), thread
        except psycopg.OperationalError:
            time.sleep(0.01)


def _first_delivery(sock: socket.socket, timeout: float = 60.0) -> float:
    """NOTIFY every probe interval until the client receives something; when it did."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(DB_URI, autocommit=True) as db:
        while time.monotonic() < deadline:
            db.execute("SELECT pg_notify(%s, %s)", (LISTEN, '{"channel":"faults"}'))
            if select.select([sock], [], [], _PROBE_INTERVAL)[0]:
                received = time.monotonic()
                if not sock.recv(65536):
                    raise RuntimeError("the relay closed the client")
                return received
    raise RuntimeError(f"no delivery within {timeout} s")


def _drain(sock: socket.socket) -> None:
    while select.select([sock], [], [], 0)[0]:
        if not sock.recv(65536):
            raise RuntimeError("the relay closed the client")


def kill_case() -> dict[str, Any]:
    server = Server("relay", free_port(), {"PGWS_CHECK_LISTENER_INTERVAL": "1000"})
    try:
        sock = handshake(server.port, _PATH)
        with psycopg.connect(DB_URI, autocommit=True) as db:
            killed_at = time.monotonic()
            db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE application_name = 'pgws-relay' AND query ILIKE 'listen%%'")
        resumed = _first_delivery(sock)
        return {"resume_s": resumed - killed_at, "gaps": server.stats()["gaps"]}
    finally:
        server.stop()


def restart_case() -> dict[str, Any]:
    server = Server("relay", free_port(), {"PGWS_CHECK_LISTENER_INTERVAL": "1000"})
    try:
        sock = handshake(server.port, _PATH)
        _postgres("stop")
        accepted, starting = _accepting_after(lambda: _postgres("start"))
        resumed = _first_delivery(sock)
        starting.join()
        return {"resume_s": resumed - accepted, "gaps": server.stats()["gaps"]}
    finally:
        _postgres("start", check=False)
        server.stop()


def down_at_start_case() -> dict[str, Any]:
    _postgres("stop")
    port = free_port()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    def start_relay() -> None:  # Server() waits for LISTEN, which needs the database.
        holder["server"] = Server("relay", port)
        ready.set()

    starter = threading.Thread(target=start_relay)
    try:
        starter.start()
        deadline = time.monotonic() + 30
        while True:  # The port opens before the database is reached.
            try:
                sock = handshake(port, _PATH)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        time.sleep(_DOWN_AT_START)
        accepted, starting = _accepting_after(lambda: _postgres("start"))
        resumed = _first_delivery(sock)
        starting.join()
        starter.join(30)
        return {"resume_s": resumed - accepted, "gaps": holder["server"].stats()["gaps"]}
    finally:
        _postgres("start", check=False)
        starter.join(30)
        if "server" in holder:
            holder["server"].stop()


def _sigterm(answer: bool) -> dict[str, Any]:
    """SIGTERM with 1,000 clients that answer the close (as client libraries do) or not."""
    server = Server("relay", free_port())
    socks = [handshake(server.port, _PATH) for _ in range(_SIGTERM_CLIENTS)]
    selector = selectors.DefaultSelector()
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ)
    codes: dict[socket.socket, int | None] = {}
    signalled = time.monotonic()
    server.proc.terminate()
    while len(codes) < len(socks) and server.proc.poll() is None:
        for key, _ in selector.select(timeout=0.05):
            sock = key.fileobj
            data = recv_ready(sock)  # type: ignore[arg-type]
            if data is None:
                continue
            selector.unregister(sock)
            codes[sock] = int.from_bytes(data[2:4], "big") if data[:1] == b"\x88" else None  # type: ignore[index]
            if answer and data:
                with contextlib.suppress(OSError):
                    sock.send(frame(8, (1001).to_bytes(2, "big")))  # type: ignore[union-attr]
    status = server.proc.wait(60)
    exited = time.monotonic()
    for sock in socks:
        sock.close()
    server.stop()
    return {"exit_s": exited - signalled, "exit_status": status,
            "closed_1001": sum(1 for code in codes.values() if code == 1001)}


CASES: dict[str, Callable[[], dict[str, Any]]] = {
    "kill": kill_case, "restart": restart_case, "down-at-start": down_at_start_case,
    "sigterm": lambda: _sigterm(answer=True), "sigterm-silent": lambda: _sigterm(answer=False),
}


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    result: dict[str, Any] = {"machine": machine(), "commit": commit(),
                              "started": time.strftime("%F %T"), "runs": args.runs,
                              "cases": {}}
    for name in args.cases.split(","):
        runs = [CASES[name]() for _ in range(args.runs)]
        result["cases"][name] = runs
        figures = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(f"{name:>14}: " + ", ".join(
            f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}"
            for key, value in figures.items()), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(dumps(result))


if __name__ == "__main__":
    main()
