"""Burst fan-out: N clients on one channel, M notifications, deliveries per second.

Starts the real ``pgws-relay`` (loopback only), opens the clients from separate processes with
plain non-blocking sockets (so the client side is cheap and never shares the relay's process),
sends M NOTIFYs through PostgreSQL in transactions of B, and measures from the first commit to
the last frame received. Reports deliveries/s and the relay's CPU seconds per 1,000 deliveries.

    python bench/fanout.py --clients 1000 --messages 2000 --batch 100 --runs 3

Every run is bounded: clients give up after ``--timeout`` seconds, and the relay is stopped.
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing as mp
import os
import re
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import jwt
import psycopg

DB_URI = os.environ.get("PGWS_BENCH_DB_URI", "postgresql://postgres@127.0.0.1:5432/postgres")
SECRET = "benchbenchbenchbenchbenchbenchbe"
RELAY = os.path.join(os.path.dirname(sys.executable), "pgws-relay")
LISTEN = "pgws_bench"
#: An Econia fill_event envelope as json_build_object writes it: ~300 bytes on the wire.
FILL = ('{"channel" : "fill_event", "payload" : {"txn_version":154106900,"event_idx":%d,'
        '"emit_address":"0xaa","time":"2024-01-02T03:04:05.123456+00:00","maker_address":"0xaa",'
        '"maker_custodian_id":0,"maker_order_id":18446744073709551616000001,"maker_side":true,'
        '"market_id":7,"price":12345,"sequence_number_for_trade":1,"size":100,'
        '"taker_address":"0xbb","taker_custodian_id":1,"taker_order_id":99,'
        '"taker_quote_fees_paid":250}}')


def _handshake(port: int, path: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during handshake")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(head.split(b"\r\n", 1)[0].decode())
    sock.setblocking(False)
    return sock


def _count_frames(buffer: bytearray) -> tuple[int, int]:
    """Count whole data frames at the start of ``buffer``; return (frames, bytes consumed)."""
    frames = offset = 0
    end = len(buffer)
    while offset + 2 <= end:
        opcode = buffer[offset] & 0x0F
        size = buffer[offset + 1] & 0x7F
        header = 2
        if size == 126:
            if offset + 4 > end:
                break
            size = int.from_bytes(buffer[offset + 2:offset + 4], "big")
            header = 4
        elif size == 127:
            if offset + 10 > end:
                break
            size = int.from_bytes(buffer[offset + 2:offset + 10], "big")
            header = 10
        if offset + header + size > end:
            break
        if opcode == 0x1:
            frames += 1
        offset += header + size
    return frames, offset


def _client_process(port: int, path: str, count: int, expected: int, timeout: float,
                    ready: Any, go: Any, results: Any) -> None:
    socks = []
    for _ in range(count):
        socks.append(_handshake(port, path))
    selector = selectors.DefaultSelector()
    state = {}
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ)
        state[sock] = [bytearray(), 0]
    ready.put(count)
    go.wait()
    done = 0
    last = time.time()
    deadline = time.monotonic() + timeout
    while done < count and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.5):
            sock = key.fileobj
            entry = state[sock]
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                continue
            if not data:
                selector.unregister(sock)
                done += 1
                continue
            entry[0] += data
            frames, used = _count_frames(entry[0])
            del entry[0][:used]
            entry[1] += frames
            if entry[1] >= expected:
                selector.unregister(sock)
                done += 1
                last = time.time()
    received = sum(entry[1] for entry in state.values())
    results.put((received, last))
    for sock in socks:
        sock.close()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_relay() -> tuple[subprocess.Popen[str], int]:
    env = {**os.environ, "PGWS_DB_URI": DB_URI, "PGWS_JWT_SECRET": SECRET,
           "PGWS_HOST": "127.0.0.1", "PGWS_PORT": "0", "PGWS_LISTEN_CHANNEL": LISTEN,
           "PGWS_LOG_LEVEL": "INFO"}
    proc = subprocess.Popen([RELAY], env=env, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    assert proc.stderr is not None
    port = 0
    for line in proc.stderr:
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if match:
            port = int(match.group(1))
        if "listening on channel" in line:
            break
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    return proc, port


def run_once(clients: int, messages: int, batch: int, procs: int, timeout: float
             ) -> dict[str, float]:
    relay, port = _start_relay()
    try:
        path = "/fill_event/" + jwt.encode({"mode": "r"}, SECRET, algorithm="HS256")
        ctx = mp.get_context("fork")
        ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        shares = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
        workers = [ctx.Process(target=_client_process,
                               args=(port, path, share, messages, timeout, ready, go, results))
                   for share in shares if share]
        for worker in workers:
            worker.start()
        for _ in workers:
            ready.get(timeout=120)
        payloads = [FILL % n for n in range(messages)]
        with psycopg.connect(DB_URI, autocommit=False) as db:
            cpu_before = _cpu_seconds(relay.pid)
            go.set()
            start = time.time()
            for first in range(0, messages, batch):
                for payload in payloads[first:first + batch]:
                    db.execute("SELECT pg_notify(%s, %s)", (LISTEN, payload))
                db.commit()
            produced = time.time()
            outcomes = [results.get(timeout=timeout + 30) for _ in workers]
            cpu = _cpu_seconds(relay.pid) - cpu_before
        for worker in workers:
            worker.join(30)
        received = sum(r for r, _ in outcomes)
        end = max(last for _, last in outcomes)
        elapsed = end - start
        return {"clients": clients, "messages": messages, "batch": batch,
                "delivered": received, "expected": clients * messages,
                "seconds": elapsed, "produce_seconds": produced - start,
                "deliveries_per_s": received / elapsed,
                "cpu_ms_per_1000": 1000 * cpu / max(received, 1) * 1000}
    finally:
        relay.terminate()
        relay.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--json", help="write the raw results to this file")
    args = parser.parse_args()
    results = [run_once(args.clients, args.messages, args.batch, args.procs, args.timeout)
               for _ in range(args.runs)]
    for r in results:
        print(f"clients={r['clients']} messages={r['messages']} batch={r['batch']} "
              f"delivered={r['delivered']}/{r['expected']} in {r['seconds']:.2f}s: "
              f"{r['deliveries_per_s']:,.0f} deliveries/s, "
              f"relay CPU {r['cpu_ms_per_1000']:.1f} ms per 1,000 deliveries")
    rates = [r["deliveries_per_s"] for r in results]
    print(f"median {statistics.median(rates):,.0f} deliveries/s "
          f"(min {min(rates):,.0f}, max {max(rates):,.0f}, {len(rates)} runs)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
