"""A private PostgreSQL cluster for benchmarks and the fleet test: made, started, stopped and
removed by the script that needs it, never the machine's shared one.

    with Cluster(listen="10.232.1.2", netns="pgwsf123-db") as pg:
        pg.uri("10.232.1.2")   # postgres://postgres@10.232.1.2:5432/postgres

Theory of operation
-------------------
``initdb`` (trust authentication, user ``postgres``) writes a data directory under ``/tmp``
named ``pgws-pg-<pid>-*``, owned by the ``postgres`` system user, since PostgreSQL refuses to
run as root. ``pg_ctl start -w`` runs the server as that user (``runuser``), inside a network
namespace when one is given (``ip netns exec``), listening on the given address, on 127.0.0.1
inside that namespace, and on a Unix socket in the data directory; it returns once the server
accepts connections. Settings are ``-c`` options on the command line, so the directory's files
stay initdb's own. The benchmark's defaults trade durability for start-up time only where the
caller says so (``fast=True``: ``fsync=off``); a measurement of commit rates keeps PostgreSQL's
defaults.

Clean-up: :meth:`Cluster.close` stops the server (``immediate``: nothing in it is worth a
checkpoint) and removes the directory, tolerating a partial set-up; the ``with`` block calls it
on any exit. :func:`remove_stale` removes the clusters of processes that are gone (a killed
run), server first. Needs root and the ``postgres`` user of Debian's packages.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

#: Where Debian's packages put the server's programs; the newest version found is used.
_BINARIES = "/usr/lib/postgresql/*/bin"
_PREFIX = "pgws-pg-"
_USER = "postgres"


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"{_BINARIES}/{name}"),
                   key=lambda path: int(re.sub(r"\D", "", path.split("/")[4]) or 0))
    if not found:
        raise RuntimeError(f"{name} not found under {_BINARIES} (Debian's postgresql package)")
    return found[-1]


def _run(args: list[str], timeout: float = 60.0) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {result.returncode}: "
                           f"{(result.stderr or result.stdout).strip()[-2000:]}")
    return result.stdout


class Cluster:
    """One throwaway PostgreSQL server; see the module's docstring."""

    def __init__(self, listen: str = "127.0.0.1", port: int = 5432, netns: str | None = None,
                 fast: bool = True, settings: dict[str, str] | None = None) -> None:
        self.listen = listen
        self.port = port
        self.netns = netns
        self.settings = {"max_connections": "300", "shared_buffers": "128MB",
                         **({"fsync": "off", "synchronous_commit": "off",
                             "full_page_writes": "off"} if fast else {}),
                         **(settings or {})}
        self.directory: Path | None = None

    @property
    def data(self) -> Path:
        assert self.directory is not None, "the cluster is not open"
        return self.directory / "data"

    @property
    def log_file(self) -> Path:
        assert self.directory is not None, "the cluster is not open"
        return self.directory / "server.log"

    def uri(self, host: str | None = None, database: str = "postgres") -> str:
        return f"postgres://{_USER}@{host or self.listen}:{self.port}/{database}"

    def open(self) -> Cluster:
        if os.geteuid() != 0:
            raise RuntimeError("a private PostgreSQL cluster needs root (runuser, ip netns)")
        self.directory = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-"))
        try:
            shutil.chown(self.directory, _USER, _USER)
            self.directory.chmod(0o700)
            _run(["runuser", "-u", _USER, "--", _bin("initdb"), "-D", str(self.data), "-A",
                  "trust", "-U", _USER, "--no-sync", "-E", "UTF8", "--locale", "C"])
            with open(self.data / "pg_hba.conf", "a") as hba:
                # Every host that reaches this server is one the script made.
                hba.write("host all all 0.0.0.0/0 trust\n")
            addresses = ",".join(dict.fromkeys([self.listen, "127.0.0.1"]))
            options = [f"-c listen_addresses={addresses}", f"-c port={self.port}",
                       f"-c unix_socket_directories={self.data}"]
            options += [f"-c {name}={value}" for name, value in self.settings.items()]
            prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
            _run([*prefix, "runuser", "-u", _USER, "--", _bin("pg_ctl"), "-D", str(self.data),
                  "-l", str(self.log_file), "-w", "-t", "60", "-o", " ".join(options),
                  "start"])
        except BaseException:
            self.close()
            raise
        return self

    def restart(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """``pg_ctl restart -m mode``, waiting at most ``timeout`` seconds for the server to
        stop and start (RuntimeError when it did not: a client held its shutdown, say)."""
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        _run([*prefix, "runuser", "-u", _USER, "--", _bin("pg_ctl"), "-D", str(self.data),
              "-l", str(self.log_file), "-m", mode, "-w", "-t", f"{timeout:g}", "restart"],
             timeout=timeout * 2 + 10)

    def close(self) -> None:
        """Stop the server if it runs and remove its directory; safe to call twice."""
        if self.directory is None:
            return
        _stop(self.directory / "data")
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory = None

    def __enter__(self) -> Cluster:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stop(data: Path) -> None:
    """Stop the postmaster of ``data`` at once, whatever namespace it runs in."""
    try:
        pid = int((data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    if not _runs_in(pid, data):
        return  # A stale file: that pid now belongs to another process, or to none.
    try:
        os.kill(pid, signal.SIGQUIT)  # PostgreSQL's "immediate shutdown".
    except ProcessLookupError:
        return
    for _ in range(100):
        if _gone(pid):
            return
        time.sleep(0.05)  # Polling: the postmaster is not this process's child.
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _runs_in(pid: int, data: Path) -> bool:
    """``pid`` is a postmaster of ``data``: the postmaster works in its data directory."""
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")) == data.resolve()
    except OSError:
        return False


def _gone(pid: int) -> bool:
    """The process has exited (a zombie counts: whoever adopted it has yet to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def remove_stale() -> list[str]:
    """Remove clusters under the temporary directory whose creating process is gone."""
    removed = []
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{_PREFIX}*")):
        found = re.match(rf"{_PREFIX}(\d+)-", os.path.basename(path))
        if not found or os.path.exists(f"/proc/{found.group(1)}"):
            continue
        _stop(Path(path) / "data")
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
