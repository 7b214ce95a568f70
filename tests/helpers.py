"""Shared test helpers: the real PostgreSQL, tokens, and the real ``pgws-relay`` as a subprocess.

Imported by the tests (``from tests.helpers import …``); the fixtures that use them are in
``tests/conftest.py``."""

from __future__ import annotations

import datetime
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request

from relay.auth import sealing
from relay.auth.tokens import read_secret
from relay.wire.positions import Sealer

DB_HOST = os.environ.get("PGWS_TEST_DB_HOST", "127.0.0.1")
DB_URI = os.environ.get("PGWS_TEST_DB_URI", f"postgresql://postgres@{DB_HOST}:5432/postgres")
SECRET = "reallyreallyreallyreallyverysafe"
# The command installed beside this interpreter (a venv), else the one on PATH.
RELAY = os.path.join(os.path.dirname(sys.executable), "pgws-relay")
if not os.path.exists(RELAY):
    RELAY = shutil.which("pgws-relay") or RELAY
TIMEOUT = 15.0
#: Seals and opens positions as a relay with SECRET does (its key is derived from it).
SEALER = Sealer(sealing.position_keys(None, None, SECRET.encode(),
                                      read_secret(SECRET.encode()))[0])


def token(claims: dict[str, Any], secret: str | bytes = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


def unique_channel(prefix: str = "pgws_test") -> str:
    return f"{prefix}_{secrets.token_hex(6)}"


def notify(channel: str, *payloads: str, db_uri: str = DB_URI) -> None:
    """Send NOTIFYs in one transaction (they are delivered at commit)."""
    with psycopg.connect(db_uri, autocommit=False) as conn:
        for payload in payloads:
            conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))
        conn.commit()


def sigint_as_from_a_terminal() -> None:
    """``preexec_fn`` for a child that the test stops with SIGINT (Ctrl-C). A suite started in
    the background of a non-interactive shell inherits SIGINT ignored (POSIX), and so would
    the child, which would then never stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def unreachable_db_uri() -> str:
    """A database URI on a loopback port nothing listens on: an outage that never ends."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def run_to_exit(env: dict[str, str], prefix: tuple[str, ...] = ()) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of a ``pgws-relay`` that must exit at once; one that
    starts instead is killed with everything it started (workers included) and fails the test."""
    proc = subprocess.Popen([*prefix, RELAY], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the relay started instead of exiting")
    return proc.returncode, stdout, stderr


def raw_client(port: int, path: str, rcvbuf: int | None = None
               ) -> tuple[socket.socket, WSConnection]:
    """A WebSocket client on a bare socket (wsproto), for clients that must misbehave."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    conn = WSConnection(ConnectionType.CLIENT)
    sock.sendall(conn.send(Request(host="localhost", target=path)))
    while True:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("closed during the handshake")
        conn.receive_data(data)
        if any(isinstance(event, AcceptConnection) for event in conn.events()):
            return sock, conn


def tls_files(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for ``localhost`` and its key, as PEM files in ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def eventually(condition: Callable[[], Any], timeout: float = TIMEOUT, what: str = "") -> Any:
    """Poll ``condition()`` until it is truthy (for state no event announces); fail after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()  # Never set: its wait is the pause between checks.
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        pause.wait(0.05)


class Lines:
    """Lines a reader thread collects from a subprocess; waits wake when a line arrives."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self._changed = threading.Condition()

    def append(self, line: str) -> None:
        with self._changed:
            self.items.append(line)
            self._changed.notify_all()

    def close(self) -> None:
        """The stream ended: wake the waiters so they can see it."""
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, condition: Callable[[], Any], timeout: float = TIMEOUT,
                 what: str = "") -> Any:
        """Wait until ``condition()`` is truthy, re-checked at each new line; fail after
        ``timeout`` seconds."""
        with self._changed:
            value = self._changed.wait_for(condition, timeout)
        if not value:
            raise AssertionError(f"timed out waiting for {what or condition}")
        return value

    def read_from(self, stream: Any) -> threading.Thread:
        def read() -> None:
            for line in stream:
                self.append(line.rstrip("\n"))
            self.close()

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        return thread


def check_postgres() -> None:
    try:
        with psycopg.connect(DB_URI, connect_timeout=5):
            pass
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {DB_URI}: {exc}")


def _cluster() -> list[str] | None:
    """``pg_ctlcluster`` arguments for the local cluster, or None where there is none to drive."""
    if DB_HOST not in ("127.0.0.1", "localhost") or not shutil.which("pg_ctlcluster"):
        return None
    try:
        versions = sorted(os.listdir("/etc/postgresql"))
    except OSError:
        return None
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main"] \
        if versions else None


CLUSTER = _cluster()


def postgres(action: str) -> None:
    """Stop, start or restart the local PostgreSQL server; ``start`` returns once it accepts."""
    assert CLUSTER is not None
    subprocess.run([*CLUSTER, action], check=True, timeout=120, stdin=subprocess.DEVNULL,
                   capture_output=True)
    if action != "stop":
        check_postgres()


class RelayProcess:
    """A running ``pgws-relay``: its port, its log lines, and ways to stop it."""

    def __init__(self, env: dict[str, str], args: list[str] | None = None,
                 prefix: tuple[str, ...] = ()) -> None:
        """``prefix``: a command that runs the relay (``unshare …``, say)."""
        self.env = env
        self.proc = subprocess.Popen(
            [*prefix, RELAY, *(args or [])], env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self._lines = Lines()
        self.lines = self._lines.items
        self._reader = self._lines.read_from(self.proc.stdout)
        self.port = 0

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = TIMEOUT, start: int = 0) -> re.Match:
        """The first log line from index ``start`` on that matches ``pattern``."""
        return self.wait_for_line_at(pattern, timeout, start)[1]

    def wait_for_line_at(self, pattern: str, timeout: float = TIMEOUT, start: int = 0
                         ) -> tuple[int, re.Match]:
        """Like :meth:`wait_for_line`, with the index of the line."""
        regex = re.compile(pattern)

        def found() -> tuple[int, re.Match] | None:
            for index in range(start, len(self.lines)):
                match = regex.search(self.lines[index])
                if match:
                    return index, match
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"relay exited ({self.proc.returncode}):\n{self.log}")
            return None

        return self._lines.wait_for(found, timeout, f"log line {pattern!r}")

    def wait_ready(self) -> None:
        match = self.wait_for_line(r"listening on 127\.0\.0\.1:(\d+)")
        self.port = int(match.group(1))
        self.wait_for_line(r"listening on channel")

    def url(self, path: str, scheme: str = "ws") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def stats(self) -> dict[str, int]:
        """Ask for the ``stats:`` line (SIGUSR1) and return its fields."""
        start = len(self.lines)
        self.signal(signal.SIGUSR1)
        line = self.wait_for_line(r"stats: (.*)", start=start).group(1)
        return {name: int(value) for name, value in
                (field.split("=") for field in line.split())}

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
        self._reader.join(TIMEOUT)


def relay_env(**overrides: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PGWS_")}
    env.update({
        "PGWS_DB_URI": DB_URI,
        "PGWS_JWT_SECRET": SECRET,
        "PGWS_HOST": "127.0.0.1",
        "PGWS_PORT": "0",
        "PGWS_LISTEN_CHANNEL": unique_channel("pgws_listen"),
        "PGWS_LOG_LEVEL": "DEBUG",
    })
    env.update(overrides)
    return env


# -- the browser (Debian's chromium + chromium-driver, through Selenium) ----------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} not found (apt-get install {package})"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None
