"""Several worker processes on one port: start them, pass signals on, answer for them, report.

Theory of operation
-------------------
With ``PGWS_WORKERS=W`` (W > 1) the command becomes a small supervisor. It starts W copies of
itself (``python -m relay``) with ``PGWS_WORKERS=1`` and :data:`WORKER_ENV` set; a worker binds
the port with SO_REUSEPORT, so the kernel spreads new connections over the workers, and each
worker has its own LISTEN connection (every notification reaches every worker, which serves
its own clients). The supervisor forwards SIGTERM/SIGINT (stop) and SIGUSR1 (stats) to every
worker and waits.

A worker that ends on its own either means it or died. It means it with status 1 (its listener
gave up: the database is gone past ``PGWS_RETRIES``) or 2 (a configuration error): every other
worker would meet the same, so the supervisor stops them and exits with that status, and an
external supervisor sees the failure. Any other end (a signal such as the kernel's OOM kill, or
:data:`CRASHED` after a bug) costs that worker's clients their connections, not the service: the
supervisor starts it again, after a pause that doubles from :data:`RESTART_PAUSE` up to
:data:`RESTART_PAUSE_MAX` while it keeps dying within :data:`RESTART_STABLE` seconds of its start,
logs each restart and counts it (``pgws_worker_restarts_total`` on the admin port). Its clients
reconnect to the workers still running, and the client library resumes them.

With ``PGWS_ADMIN_PORT`` set, the supervisor serves the admin port for all workers: each worker
serves ``/ready`` and ``/metrics`` on a Unix socket of its own (:data:`ADMIN_SOCKET_ENV`, in a
folder only this user can enter), and :class:`relay.ops.admin.WorkersProbe` asks every one of
them, so that one probe or scrape sees the whole service, not the worker the kernel picked.

Processes, signals and the admin listener only; it never touches a client or the database.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping

import trio

from relay.config import Config
from relay.ops import admin

log = logging.getLogger(__name__)

#: Set in a worker's environment (to its index); asks for SO_REUSEPORT. Internal.
WORKER_ENV = "PGWS_WORKER_INDEX"

#: Set in a worker's environment when the supervisor serves the admin port: the Unix socket on
#: which the worker answers the supervisor's questions. Internal.
ADMIN_SOCKET_ENV = "PGWS_WORKER_ADMIN_SOCKET"


#: Set in a worker's environment: its supervisor's pid, and the descriptor of its end of the
#: lifeline (:func:`lifeline`). Internal.
SUPERVISOR_ENV = "PGWS_WORKER_SUPERVISOR"
LIFELINE_ENV = "PGWS_WORKER_LIFELINE"

#: The status of a worker (or a single process) that stopped on an internal error.
CRASHED = 70  # EX_SOFTWARE

#: Statuses with which a worker ends the service on purpose (see the module's opening).
_MEANT = (1, 2)

#: Seconds before a dead worker is started again, doubled (up to the maximum) for each death
#: within ``RESTART_STABLE`` seconds of its start: a worker that dies at once (a bug at
#: start-up) is retried every half minute, not in a loop that starves the live ones.
RESTART_PAUSE = 0.5
RESTART_PAUSE_MAX = 30.0
RESTART_STABLE = 60.0


def is_worker() -> bool:
    return WORKER_ENV in os.environ


def lifeline() -> int | None:
    """This worker's end of the lifeline to its supervisor (None outside a worker).

    A supervisor killed with SIGKILL cannot pass a stop on, and orphaned workers would keep the
    port and the database connections. So the supervisor holds the write end of a pipe that it
    never writes, and each worker the read end: when the supervisor's process is gone, however,
    the read end reads EOF (:func:`until_supervisor_ends`). (Linux's ``PR_SET_PDEATHSIG`` would
    not do: it fires when the *thread* that started the worker ends, and Trio starts processes
    from a worker thread that ends after 10 idle seconds.)
    """
    if not is_worker() or LIFELINE_ENV not in os.environ:
        return None
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if supervisor is not None and os.getppid() != int(supervisor):
        # Orphaned before it even started (compared by pid, not with 1: in a container the
        # supervisor itself may be process 1).
        os.kill(os.getpid(), signal.SIGTERM)
    return int(os.environ[LIFELINE_ENV])


async def until_supervisor_ends(fd: int) -> None:
    """Return when the supervisor is gone: its end of the lifeline closed (EOF)."""
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            if not os.read(fd, 1):
                return
        except BlockingIOError:
            continue


def admin_socket() -> str | None:
    """This worker's private admin socket, if the supervisor asked for one."""
    return os.environ.get(ADMIN_SOCKET_ENV) if is_worker() else None


def supervise(env: Mapping[str, str], config: Config) -> int:
    """Run ``config.workers`` worker processes until they end; return the exit status to use."""
    folder = tempfile.mkdtemp(prefix="pgws-relay-") if config.admin_port is not None else None
    try:
        return trio.run(_supervise, env, config, folder)
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


async def _supervise(env: Mapping[str, str], config: Config, folder: str | None) -> int:
    sockets = [os.path.join(folder, f"worker-{index}.sock") for index in range(config.workers)
               ] if folder is not None else []
    probe = admin.WorkersProbe(sockets)
    admin_listeners: list[trio.SocketListener] = []
    if config.admin_port is not None:
        try:
            admin_listeners = await admin.open_admin_listeners(config.admin_host,
                                                               config.admin_port)
        except OSError as exc:
            log.error("cannot open the admin listener (PGWS_ADMIN_HOST %s, PGWS_ADMIN_PORT %s): "
                      "%s", config.admin_host, config.admin_port, exc)
            return 1
        log.info("admin listening on %s for %d workers (/health, /ready, /metrics)",
                 admin.bound(admin_listeners), config.workers)

    # The lifeline (see lifeline()): the supervisor keeps both ends for its whole life; each
    # worker gets the read end, and sees EOF on it once the supervisor's process is gone.
    read_end, write_end = os.pipe()
    try:
        # Signals are caught before the first worker exists, so that a stop arriving during the
        # start still reaches every worker instead of killing the supervisor alone.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:

            async def start(index: int) -> trio.Process:
                worker_env = {**env, "PGWS_WORKERS": "1", WORKER_ENV: str(index),
                              SUPERVISOR_ENV: str(os.getpid()), LIFELINE_ENV: str(read_end)}
                if sockets:
                    worker_env[ADMIN_SOCKET_ENV] = sockets[index]
                return await trio.lowlevel.open_process(
                    [sys.executable, "-m", "relay"], env=worker_env, stdin=subprocess.DEVNULL,
                    pass_fds=(read_end,))

            procs: list[trio.Process] = [await start(index) for index in range(config.workers)]
            stopping = False
            status = 0

            def stop_all(signum: int) -> None:
                for proc in procs:
                    if proc.returncode is None:
                        proc.send_signal(signum)

            async def watch(index: int) -> None:
                nonlocal stopping, status
                pause = RESTART_PAUSE
                while True:
                    started = trio.current_time()
                    code = await procs[index].wait()
                    if stopping:
                        if code not in (0, -signal.SIGTERM, -signal.SIGINT) and status == 0:
                            status = code if code > 0 else 1
                        return
                    if code in _MEANT or code == 0:
                        # It means it: every worker would meet the same; end the service as a whole.
                        stopping = probe.stopping = True
                        status = code if code > 0 else 1
                        log.error("worker %d ended with status %d; stopping the others", index,
                                  code)
                        stop_all(signal.SIGTERM)
                        return
                    if trio.current_time() - started >= RESTART_STABLE:
                        pause = RESTART_PAUSE
                    how = f"signal {-code}" if code < 0 else f"status {code}"
                    log.error("worker %d died (%s); starting it again in %g s", index, how, pause)
                    probe.restarts += 1
                    await trio.sleep(pause)
                    pause = min(pause * 2, RESTART_PAUSE_MAX)
                    if stopping:
                        return
                    procs[index] = await start(index)

            async def forward() -> None:
                nonlocal stopping
                async for signum in signals:
                    if signum != signal.SIGUSR1:
                        stopping = probe.stopping = True
                    stop_all(signum)  # SIGUSR1: each worker logs its own stats line.

            async with trio.open_nursery() as nursery:
                if admin_listeners:
                    nursery.start_soon(admin.AdminServer(probe).serve, admin_listeners)
                nursery.start_soon(forward)
                async with trio.open_nursery() as waiting:
                    for index in range(len(procs)):
                        waiting.start_soon(watch, index)
                nursery.cancel_scope.cancel()
    finally:
        os.close(read_end)
        os.close(write_end)
    return status
