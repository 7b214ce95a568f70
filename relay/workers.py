"""Several worker processes on one port: start them, pass signals on, report how they ended.

Theory of operation
-------------------
With ``PGWS_WORKERS=W`` (W > 1) the command becomes a small supervisor. It starts W copies of
itself (``python -m relay``) with ``PGWS_WORKERS=1`` and :data:`WORKER_ENV` set; a worker binds
the port with SO_REUSEPORT, so the kernel spreads new connections over the workers, and each
worker has its own LISTEN connection (every notification reaches every worker, which serves
its own clients). The supervisor forwards SIGTERM/SIGINT (stop) and SIGUSR1 (stats) to every
worker and waits. If a
worker ends on its own (its listener gave up, say), the supervisor stops the others and exits
with that worker's status (1 when it was 0), so an external supervisor sees the failure.

Plain processes and signals only; it never touches a socket or the database.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping

#: Set in a worker's environment (to its index); asks for SO_REUSEPORT. Internal.
WORKER_ENV = "PGWS_WORKER_INDEX"


def is_worker() -> bool:
    return WORKER_ENV in os.environ


def supervise(env: Mapping[str, str], workers: int) -> int:
    """Run ``workers`` worker processes until they end; return the exit status to use."""
    procs = [subprocess.Popen([sys.executable, "-m", "relay"],
                              env={**env, "PGWS_WORKERS": "1", WORKER_ENV: str(index)})
             for index in range(workers)]
    by_pid = {proc.pid: proc for proc in procs}
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = stopping or signum != signal.SIGUSR1
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGUSR1, forward)  # Each worker logs its own stats line.
    status = 0
    while by_pid:
        pid, wait_status = os.waitpid(-1, 0)
        proc = by_pid.pop(pid, None)
        if proc is None:
            continue
        code = os.waitstatus_to_exitcode(wait_status)
        proc.returncode = code
        if not stopping:
            # A worker ended on its own: the service is degraded; end it as a whole.
            stopping = True
            status = code if code > 0 else 1
            print(f"pgws-relay: worker {proc.args} ended with status {code}; stopping the others",
                  file=sys.stderr, flush=True)
            for other in by_pid.values():
                other.send_signal(signal.SIGTERM)
        elif code not in (0, -signal.SIGTERM, -signal.SIGINT) and status == 0:
            status = code if code > 0 else 1
    return status
