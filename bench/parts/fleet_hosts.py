"""The hosts of a fleet on one database: relays behind HAProxy, a private PostgreSQL, real faults.

    with Fleet(relays=3, directory=run_dir) as fleet:
        fleet.kill(1)                       # SIGKILL relay host 1
        fleet.link(2, "all", up=False)      # partition host 2
        fleet.balancer()                    # {"r1": ("DOWN", 0), "r2": ("UP", 41), ...}

Theory of operation
-------------------
Every host is a network namespace this module makes (names ``pgwsf<pid>-<role>``), so every
address below exists only inside them, and two fleets (a benchmark and the suite's test) never
meet::

    cl ──edge 10.233.0.0/30── lb ──front 10.233.1.0/24── r1 r2 r3 ──back 10.233.2.0/24── db

``cl`` holds the load clients, ``lb`` HAProxy (Debian's package), ``rN`` one ``pgws-relay``
each, ``db`` a private PostgreSQL cluster (:mod:`bench.parts.pgcluster`). The front and back
networks are two bridges in a switch namespace ``sw``; each host's cable is a veth pair with one
end in the host (named ``front``/``back``/``edge`` there) and one on a bridge (``f-rN``, ``b-rN``).
A fault is what happens to real hosts: :meth:`Fleet.kill` (SIGKILL), :meth:`Fleet.link` (the
switch's end of a cable down: packets vanish, nobody is told), :meth:`Fleet.reload` (HAProxy's
master-worker reload, SIGUSR2).

HAProxy runs ``deploy/haproxy.cfg``, the configuration operators are given, with the fleet's
addresses: it balances TCP by least connections, checks each relay's ``/ready`` on its admin
port every 500 ms, marks a relay down after two failures and then cuts that relay's sessions
(``on-marked-down shutdown-sessions``), so clients of a relay that lost its database or its
network move at once; a connection refused (a dead relay not yet marked down) is retried on
another relay (``option redispatch``).

The producer is the caller's: :meth:`Fleet.database_uri` reaches the private cluster by its
Unix socket, so the benchmark's process needs no address in any namespace.

Clean-up: :meth:`Fleet.close` kills every process in the fleet's namespaces (``ip netns
pids``), stops and removes the cluster, and deletes the namespaces (their cables go with them);
each step tolerates a partial set-up, and the ``with`` block runs it on any exit.
:func:`remove_stale` does the same for fleets whose process is gone. Needs root, ``ip``,
``haproxy``, ``curl`` and Debian's PostgreSQL.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.parts import pgcluster
from bench.parts.paths import DEPLOY, module_command

#: Names of this module's namespaces and folders start with it, then the pid: a leftover of a
#: killed run is told apart, and removed by :func:`remove_stale`.
PREFIX = "pgwsf"
#: Every relay host has its own address, so all use the relay's and the admin port's defaults
#: as ``deploy/haproxy.cfg`` has them.
RELAY_PORT = 3000
ADMIN_PORT = 9100
BALANCER_PORT = 3000
#: Where the clients connect: HAProxy's address on the edge cable.
BALANCER_ADDRESS = "10.233.0.1"
CLIENTS_ADDRESS = "10.233.0.2"
#: HAProxy's address towards the relays: it sends them the PROXY protocol from there.
BALANCER_FRONT_ADDRESS = "10.233.1.1"
DATABASE_ADDRESS = "10.233.2.2"
#: The listen channel of every relay of the fleet, and the channel the clients subscribe to.
LISTEN_CHANNEL = "pgws_fleet"
CHANNEL = "fleet"
SECRET = "fleetfleetfleetfleetfleetfleetfl"
#: The relays' listener heartbeat: a cut database link is noticed within two periods.
HEARTBEAT_MS = 1000
#: The balancer's configuration: the one operators are given.
_DEPLOYED = Path(DEPLOY) / "haproxy.cfg"
#: Seconds to wait for a process or a state the fleet is driven to.
WAIT = 30.0


def front(index: int) -> str:
    return f"10.233.1.{10 + index}"


def back(index: int) -> str:
    return f"10.233.2.{10 + index}"


def _run(*args: str, check: bool = True, timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {result.returncode}: "
                           f"{(result.stderr or result.stdout).strip()}")
    return result


def _wait(condition: object, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def _haproxy_config(relays: int, socket_path: Path) -> str:
    """``deploy/haproxy.cfg``, the configuration operators are given, with this fleet's
    addresses, socket and connection cap: what the fleet measures is that file."""
    text = _DEPLOYED.read_text()
    text = re.sub(r"(?m)^(\s*stats socket )\S+", rf"\g<1>{socket_path}", text)
    # This machine lets a process open 20,000 descriptors: two per session.
    text = re.sub(r"(?m)^(\s*maxconn )\d+", r"\g<1>9000", text)
    text = re.sub(r"(?m)^(\s*bind )\S*:(\d+)", rf"\g<1>{BALANCER_ADDRESS}:\g<2>", text)
    text = re.sub(r"(?m)^\s*server .*\n", "", text)
    if f"check port {ADMIN_PORT} " not in text or f":{BALANCER_PORT}" not in text:
        raise RuntimeError(f"{_DEPLOYED} no longer checks port {ADMIN_PORT} or binds "
                           f"{BALANCER_PORT}: update bench/parts/fleet_hosts.py with it")
    return text + "".join(f"    server r{i} {front(i)}:{RELAY_PORT}\n"
                          for i in range(1, relays + 1))


class Fleet:
    """The namespaces, cables and processes of one fleet; see the module's docstring."""

    def __init__(self, relays: int = 3, directory: Path | None = None,
                 relay_env: dict[str, str] | None = None,
                 database_settings: dict[str, str] | None = None) -> None:
        """``database_settings``: PostgreSQL settings of the private cluster on top of
        :class:`bench.parts.pgcluster.Cluster`'s (``wal_level=logical`` for a feeder)."""
        self.relays = relays
        self.database_settings = database_settings or {}
        self.pid = os.getpid()
        self.directory = directory
        self._own_directory = directory is None
        self.relay_env = relay_env or {}
        self.ns = {role: f"{PREFIX}{self.pid}-{role}"
                   for role in ["sw", "db", "lb", "cl", *self.hosts]}
        self.cluster: pgcluster.Cluster | None = None
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._open = False

    @property
    def hosts(self) -> list[str]:
        return [f"r{i}" for i in range(1, self.relays + 1)]

    # -- set-up ---------------------------------------------------------------------------------

    def open(self) -> Fleet:
        if os.geteuid() != 0:
            raise RuntimeError("a fleet needs root (ip netns, veth, runuser)")
        for tool in ("ip", "haproxy", "curl"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is not installed")
        self._open = True  # From here on, close() has something to undo.
        try:
            if self.directory is None:
                self.directory = Path(f"/tmp/{PREFIX}{self.pid}")
            self.directory.mkdir(parents=True, exist_ok=True)
            self._network()
            self.cluster = pgcluster.Cluster(listen=DATABASE_ADDRESS, netns=self.ns["db"],
                                             fast=True, settings=self.database_settings).open()
            self._services()
            for index in range(1, self.relays + 1):
                self.start(index, wait=False)
            for index in range(1, self.relays + 1):
                _wait(lambda i=index: self._alive(f"r{i}") and self.ready(i)[0] == 200,
                      f"relay r{index} ready")
            self._start_balancer()
        except BaseException:
            self.close()
            raise
        return self

    def _network(self) -> None:
        for name in self.ns.values():
            _run("ip", "netns", "add", name)
            _run("ip", "-n", name, "link", "set", "lo", "up")
        sw = self.ns["sw"]
        for bridge in ("brf", "brb"):
            _run("ip", "-n", sw, "link", "add", bridge, "type", "bridge")
            _run("ip", "-n", sw, "link", "set", bridge, "up")

        def cable(host: str, inside: str, outside: str, bridge: str, address: str) -> None:
            _run("ip", "link", "add", inside, "netns", self.ns[host], "type", "veth", "peer",
                 "name", outside, "netns", sw)
            _run("ip", "-n", self.ns[host], "addr", "add", f"{address}/24", "dev", inside)
            _run("ip", "-n", self.ns[host], "link", "set", inside, "up")
            _run("ip", "-n", sw, "link", "set", outside, "master", bridge, "up")

        cable("lb", "front", "f-lb", "brf", BALANCER_FRONT_ADDRESS)
        cable("db", "back", "b-db", "brb", DATABASE_ADDRESS)
        for index, host in enumerate(self.hosts, start=1):
            cable(host, "front", f"f-{host}", "brf", front(index))
            cable(host, "back", f"b-{host}", "brb", back(index))
        _run("ip", "link", "add", "edge", "netns", self.ns["cl"], "type", "veth", "peer", "name",
             "edge", "netns", self.ns["lb"])
        for host, address in (("cl", CLIENTS_ADDRESS), ("lb", BALANCER_ADDRESS)):
            _run("ip", "-n", self.ns[host], "addr", "add", f"{address}/30", "dev", "edge")
            _run("ip", "-n", self.ns[host], "link", "set", "edge", "up")

    def _services(self) -> None:
        """What must run before the relays start, once the network and the database are up:
        nothing here; a subclass's servers (a NATS cluster and its feeder) go here."""

    def _log(self, name: str) -> io.BufferedWriter:
        assert self.directory is not None
        return open(self.directory / f"{name}.log", "ab")

    def exec_prefix(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[role]]

    def database_uri(self) -> str:
        """The private cluster, by its Unix socket: for the producer, from outside the fleet."""
        assert self.cluster is not None
        return f"postgresql://postgres@/postgres?host={self.cluster.data}&port=5432"

    def relay_environment(self, index: int) -> dict[str, str]:
        return {**{k: v for k, v in os.environ.items() if not k.startswith("PGWS_")},
                "PGWS_DB_URI": f"postgres://postgres@{DATABASE_ADDRESS}:5432/postgres",
                "PGWS_JWT_SECRET": SECRET, "PGWS_HOST": front(index),
                "PGWS_PORT": str(RELAY_PORT), "PGWS_ADMIN_HOST": front(index),
                "PGWS_ADMIN_PORT": str(ADMIN_PORT), "PGWS_LISTEN_CHANNEL": LISTEN_CHANNEL,
                "PGWS_CHECK_LISTENER_INTERVAL": str(HEARTBEAT_MS),
                "PGWS_PROXY_PROTOCOL_FROM": BALANCER_FRONT_ADDRESS,
                "PGWS_LOG_LEVEL": "INFO", **self.relay_env}

    def start(self, index: int, wait: bool = True) -> None:
        """Start relay ``index`` (again); with ``wait``, until its ``/ready`` says 200."""
        host = f"r{index}"
        with self._log(host) as log:
            self.processes[host] = subprocess.Popen(
                [*self.exec_prefix(host), sys.executable, "-m", "relay"],
                env=self.relay_environment(index), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT)
        if wait:
            _wait(lambda: self._alive(host) and self.ready(index)[0] == 200,
                  f"relay {host} ready")

    def _start_balancer(self) -> None:
        assert self.directory is not None
        config = self.directory / "haproxy.cfg"
        config.write_text(_haproxy_config(self.relays, self.balancer_socket))
        with self._log("haproxy") as log:
            self.processes["lb"] = subprocess.Popen(
                [*self.exec_prefix("lb"), "haproxy", "-db", "-f", str(config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        _wait(lambda: self._alive("lb") and len(self._servers()) == self.relays and all(
            status == "UP" for status, _ in self._servers().values()),
            "HAProxy to see every relay up")

    def _alive(self, role: str) -> bool:
        process = self.processes[role]
        if process.poll() is not None:
            raise RuntimeError(f"{role} exited with status {process.returncode}; see "
                               f"{self.directory}/{role}.log")
        return True

    # -- what the operator sees -----------------------------------------------------------------

    @property
    def balancer_socket(self) -> Path:
        assert self.directory is not None
        return self.directory / "haproxy.sock"

    def _balancer_command(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.balancer_socket))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def _servers(self) -> dict[str, tuple[str, int]]:
        try:
            text = self._balancer_command("show stat")
        except OSError:
            return {}
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {row["svname"]: (row["status"], int(row["scur"] or 0)) for row in rows
                if row["pxname"] == "relays" and row["svname"] not in ("BACKEND", "FRONTEND")}

    def balancer(self) -> dict[str, tuple[str, int]]:
        """HAProxy's view: relay → (status, current sessions)."""
        return self._servers()

    def _admin(self, index: int, path: str) -> tuple[int, str]:
        result = _run(*self.exec_prefix(f"r{index}"), "curl", "-s", "-m", "1", "-w",
                      "\n%{http_code}", f"http://{front(index)}:{ADMIN_PORT}{path}",
                      check=False)
        body, _, code = result.stdout.rpartition("\n")
        return (int(code) if code.isdigit() else 0), body.strip()

    def ready(self, index: int) -> tuple[int, str]:
        """Relay ``index``'s ``/ready``: (status, body); (0, "") when it does not answer."""
        return self._admin(index, "/ready")

    def metrics(self, index: int, names: tuple[str, ...]) -> dict[str, float]:
        """The samples of relay ``index``'s ``/metrics`` whose name starts with one of
        ``names`` (labels kept in the key); empty when it does not answer."""
        code, text = self._admin(index, "/metrics")
        if code != 200:
            return {}
        samples = {}
        for line in text.splitlines():
            if line.startswith(names):
                key, _, value = line.rpartition(" ")
                samples[key] = float(value)
        return samples

    def log_lines(self, role: str, since: int = 0) -> list[str]:
        """Lines of a process's log from byte offset ``since``."""
        assert self.directory is not None
        with contextlib.suppress(FileNotFoundError), open(self.directory / f"{role}.log",
                                                          "rb") as log:
            log.seek(since)
            return log.read().decode(errors="replace").splitlines()
        return []

    def log_size(self, role: str) -> int:
        assert self.directory is not None
        try:
            return (self.directory / f"{role}.log").stat().st_size
        except FileNotFoundError:
            return 0

    # -- faults ---------------------------------------------------------------------------------

    def kill(self, index: int) -> None:
        """SIGKILL relay ``index``: its sockets close as the kernel closes them."""
        process = self.processes[f"r{index}"]
        process.kill()
        process.wait(WAIT)

    def stop(self, index: int) -> int:
        """SIGTERM relay ``index`` (a drain) and wait for it; its exit status."""
        process = self.processes[f"r{index}"]
        process.send_signal(signal.SIGTERM)
        return process.wait(WAIT)

    def link(self, index: int, which: str, up: bool) -> None:
        """Take relay ``index``'s ``front``, ``back`` or ``all`` cables down (or up) at the
        switch: its packets vanish and neither end is told."""
        for net in (("front", "back") if which == "all" else (which,)):
            _run("ip", "-n", self.ns["sw"], "link", "set", f"{net[0]}-r{index}",
                 "up" if up else "down")

    def reload(self) -> None:
        """HAProxy's master-worker reload: a new worker takes the listeners, the old one keeps
        the sessions it has."""
        self.processes["lb"].send_signal(signal.SIGUSR2)

    def client_command(self, *args: str) -> list[str]:
        """The command that runs ``bench.parts.fleet_agent`` with ``args`` in the clients' host."""
        return [*self.exec_prefix("cl"), *module_command("bench.parts.fleet_agent", *args)]

    def url(self) -> str:
        return f"ws://{BALANCER_ADDRESS}:{BALANCER_PORT}/{CHANNEL}"

    # -- clean-up -------------------------------------------------------------------------------

    def close(self) -> None:
        """Remove what exists of the fleet; every step tolerates its part being absent, and
        runs even when an earlier one failed (the first error is raised at the end).

        PostgreSQL is stopped before the namespaces are swept: its immediate shutdown removes
        its shared memory, which a SIGKILL of the postmaster would leave behind."""
        if not self._open:
            return
        errors: list[BaseException] = []

        def step(action: Callable[[], object]) -> None:
            try:
                action()
            except Exception as error:  # Clean up the rest; raise the first at the end.
                errors.append(error)

        for process in self.processes.values():
            step(process.kill)
        for process in self.processes.values():
            step(lambda process=process: process.wait(5))
        if self.cluster is not None:
            step(self.cluster.close)
        step(lambda: _kill_and_delete(list(self.ns.values())))
        if self._own_directory and self.directory is not None:
            step(lambda: shutil.rmtree(self.directory, ignore_errors=True))  # type: ignore[arg-type]
        self._open = False
        if errors:
            raise errors[0]

    def __enter__(self) -> Fleet:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kill_and_delete(namespaces: list[str]) -> None:
    existing = set(_run("ip", "netns", "list", check=False).stdout.split())
    for name in namespaces:
        if name not in existing:
            continue
        for pid in _run("ip", "netns", "pids", name, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    for name in namespaces:
        if name in existing:
            _run("ip", "netns", "del", name, check=False)


def remove_stale() -> list[str]:
    """Delete the namespaces, clusters and folders of fleets whose process is gone."""
    names = [name for name in _run("ip", "netns", "list", check=False).stdout.split()
             if (found := re.fullmatch(rf"{PREFIX}(\d+)-\w+", name))
             and not os.path.exists(f"/proc/{found.group(1)}")]
    _kill_and_delete(names)
    for path in Path("/tmp").glob(f"{PREFIX}*"):
        if path.name[len(PREFIX):].isdigit() and not os.path.exists(
                f"/proc/{path.name[len(PREFIX):]}"):
            shutil.rmtree(path, ignore_errors=True)
            names.append(str(path))
    return names + pgcluster.remove_stale()


@contextlib.contextmanager
def fleet(relays: int = 3, **kwargs: object) -> Iterator[Fleet]:
    """A :class:`Fleet`, after removing stale ones."""
    remove_stale()
    with Fleet(relays, **kwargs) as made:  # type: ignore[arg-type]
        yield made
