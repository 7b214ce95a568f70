"""A worker starved of CPU keeps its LISTEN: load must never turn into loss.

The relay's threads (all of them, or all but its loop's) are made to wait for CPU
(``SCHED_IDLE`` on one CPU, where eight busy processes of normal priority take nearly all of it)
for several heartbeat periods, with notifications committed meanwhile. The LISTEN connection is
healthy throughout; only the relay itself is late. Before the heartbeat told the two apart,
such a worker declared its connection lost and reconnected with a ``gap`` (2,331 times in a
first attempt at a million connections on one machine), and whatever was committed meanwhile
was lost.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from websockets.sync.client import connect

from tests.e2e.test_admin import admin_port, metric
from tests.helpers import TIMEOUT, RelayProcess, notify, token

#: The heartbeat period the relay runs with here (PGWS_CHECK_LISTENER_INTERVAL, ms): its
#: timeout is the same, so a starvation of STARVED_S spans several of them.
HEARTBEAT_MS = 500
#: How long the relay waits for CPU: the stimulus's length, not a wait for something to happen.
STARVED_S = 4.0


def _waited_for_cpu(pid: int) -> float:
    """Seconds the process's threads have spent runnable but not running (schedstat)."""
    total = 0
    for task in _threads(pid):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as stat:
            total += int(stat.read().split()[1])
    return total / 1e9


def _threads(pid: int) -> list[int]:
    return [int(task) for task in os.listdir(f"/proc/{pid}/task")]


@contextlib.contextmanager
def starved(pid: int, threads: list[int]) -> Iterator[None]:
    """``threads`` of ``pid`` wait for CPU while busy processes hold the one they may run on."""
    cpu = max(os.sched_getaffinity(0))
    before = {task: (os.sched_getaffinity(task), os.sched_getscheduler(task))
              for task in threads}
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                             stdin=subprocess.DEVNULL) for _ in range(8)]
    try:
        for hog in hogs:
            os.sched_setaffinity(hog.pid, {cpu})
        for task in before:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(task, {cpu})
                os.sched_setscheduler(task, os.SCHED_IDLE, os.sched_param(0))
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
        for task, (affinity, policy) in before.items():
            with contextlib.suppress(ProcessLookupError):
                os.sched_setscheduler(task, policy, os.sched_param(0))
                os.sched_setaffinity(task, affinity)


def _starve_and_check(start_relay, helpers_only: bool) -> None:
    """Starve the relay (every thread, or all but its loop's), commit notifications meanwhile;
    then every one arrives once and in order, and LISTEN was never declared lost."""
    if os.geteuid() != 0 and os.environ.get("CI") != "true":
        pytest.skip("SCHED_IDLE for another process needs root")
    relay: RelayProcess = start_relay(PGWS_CHECK_LISTENER_INTERVAL=str(HEARTBEAT_MS),
                                      PGWS_ADMIN_PORT="0")
    admin = admin_port(relay)
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    pid = relay.proc.pid
    with connect(relay.url(f"/c/{token({'mode': 'r'})}"), open_timeout=10) as client:
        notify(listen, '{"channel":"c","n":0}')
        assert client.recv(timeout=TIMEOUT) == '{"channel":"c","n":0}'
        threads = [task for task in _threads(pid) if not helpers_only or task != pid]
        assert threads, "the heartbeat's thread has not been started"
        waited = _waited_for_cpu(pid)
        with starved(pid, threads):
            for n in range(1, 4):
                notify(listen, f'{{"channel":"c","n":{n}}}')
                threading.Event().wait(STARVED_S / 3)
        # The starvation was real: the relay waited for CPU longer than a heartbeat's timeout.
        assert _waited_for_cpu(pid) - waited > HEARTBEAT_MS / 1000
        notify(listen, '{"channel":"c","n":4}')
        received = [client.recv(timeout=TIMEOUT) for _ in range(4)]
    assert received == [f'{{"channel":"c","n":{n}}}' for n in range(1, 5)]
    assert not [line for line in relay.lines if "listener connection lost" in line]
    assert metric(admin, "pgws_listener_gaps_total") == 0


@pytest.mark.fault
def test_a_worker_starved_of_cpu_keeps_its_listen_and_loses_nothing(start_relay) -> None:
    _starve_and_check(start_relay, helpers_only=False)


@pytest.mark.fault
def test_a_heartbeat_sent_late_by_a_starved_thread_is_not_a_lost_connection(start_relay) -> None:
    """The worst of it: the relay's loop runs, but the threads that send its heartbeat's NOTIFY
    (Trio's thread cache: psycopg is synchronous) wait for CPU, as they wait for the GIL behind
    a busy loop. The heartbeat goes out seconds late; the connection is fine all along. (Before
    the deadline ran from the commit, this declared LISTEN lost in 2 runs of 2.)"""
    _starve_and_check(start_relay, helpers_only=True)
