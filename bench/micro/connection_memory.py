"""Where an idle connection's bytes go: the relay's own allocations per connection, by line.

    python -m bench.micro.connection_memory                 # 1,000 then 10,000 connections
    python -m bench.micro.connection_memory --low 1000 --high 18000 --top 25

The real relay (``relay.app.run``, one worker, PostgreSQL at ``PGWS_DB_URI`` or the local one)
runs in this process under ``tracemalloc``; a child process opens plain WebSocket connections to
it (one channel, one shared read token) and keeps them idle. With ``--low`` connections open the
script takes a snapshot and reads RSS; with ``--high`` open, again. The difference, divided by
the connections added, is what one more idle connection costs, by the source line that
allocated it (grouped by file and line, the largest first), beside the RSS growth per
connection (which adds the allocator's and the kernel's overhead to Python's objects).
tracemalloc's own bookkeeping inflates RSS here: compare the RSS figure across commits, not with
``bench/scenarios/throughput.py idle``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import textwrap
import tracemalloc
from typing import Any

import trio

from bench.parts.harness import DB_URI, SECRET, token

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: The child that holds the connections: reads a count per line on stdin, opens connections up
#: to it (bench.parts.harness.handshake: only the 101 is read), prints the count it holds.
_HOLDER = textwrap.dedent("""
    import sys
    from bench.parts.harness import handshake
    port, path = int(sys.argv[1]), sys.argv[2]
    held = []
    for line in sys.stdin:
        while len(held) < int(line):
            held.append(handshake(port, path))
        print(len(held), flush=True)
""")


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def _measure(args: argparse.Namespace, port: int, out: dict[str, Any]) -> None:
    path = f"/idle/{token({'mode': 'r'})}"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(port), path],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=_ROOT)
    assert holder.stdin is not None and holder.stdout is not None
    try:
        for name, count in (("low", args.low), ("high", args.high)):
            holder.stdin.write(f"{count}\n")
            holder.stdin.flush()
            line = await trio.to_thread.run_sync(holder.stdout.readline)
            if int(line or 0) != count:
                raise SystemExit(f"the holder stopped at {line!r}")
            await trio.sleep(1.0)  # The last handshakes' tasks end; then look.
            out[name] = (tracemalloc.take_snapshot(), _rss_kib())
    finally:
        holder.kill()
        holder.wait()
    os.kill(os.getpid(), signal.SIGTERM)  # The relay's own graceful stop.


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--low", type=int, default=1000)
    parser.add_argument("--high", type=int, default=10000)
    parser.add_argument("--top", type=int, default=20, help="lines of the table")
    args = parser.parse_args()

    from relay import app, cli
    from relay.wire import positions

    port = _free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PGWS_")}
    env.update({"PGWS_DB_URI": os.environ.get("PGWS_DB_URI", DB_URI), "PGWS_JWT_SECRET": SECRET,
                "PGWS_HOST": "127.0.0.1", "PGWS_PORT": str(port), "PGWS_LOG_LEVEL": "WARNING"})
    config, loaded = cli.check(env)
    from relay.auth import sealing

    keys, _ = sealing.position_keys(config.position_key, config.position_key_previous,
                                    config.jwt_secret, loaded)
    tracemalloc.start(1)
    out: dict[str, Any] = {}

    async def both() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(app.run, config, loaded.keys, positions.Sealer(keys))
            for _ in range(200):  # The listener is up once the port answers.
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    await trio.sleep(0.05)
            await _measure(args, port, out)

    trio.run(both)
    (low, rss_low), (high, rss_high) = out["low"], out["high"]
    added = args.high - args.low
    stats = high.compare_to(low, "lineno")
    traced = sum(stat.size_diff for stat in stats)
    print(f"{added} connections added ({args.low} -> {args.high}): RSS "
          f"{(rss_high - rss_low) / added:.2f} KiB each, Python allocations "
          f"{traced / added / 1024:.2f} KiB each (tracemalloc)")
    print(f"{'bytes/conn':>10} {'blocks/conn':>11}  where")
    for stat in stats[:args.top]:
        frame = stat.traceback[0]
        where = f"{os.path.relpath(frame.filename)}:{frame.lineno}"
        print(f"{stat.size_diff / added:10.1f} {stat.count_diff / added:11.2f}  {where}")


if __name__ == "__main__":
    main()
