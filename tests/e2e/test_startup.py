"""Fail fast and loud: the real command refuses a bad configuration before it binds anything.

Every refusal is exit status 2 with exactly one line per problem on stderr
(``pgws-relay: VARIABLE: problem``). The port the relay would bind is held by the test: had the
relay tried to bind, it would have said ``cannot listen`` and exited 1, so status 2 with only
the expected lines shows it stopped before.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.helpers import (
    DB_URI,
    SECRET,
    RelayProcess,
    relay_env,
    run_to_exit,
    token,
    unreachable_db_uri,
)

SHORT = "HS256 needs at least 32, so every token would be refused"


@contextlib.contextmanager
def held_port() -> Iterator[int]:
    """A port this test listens on, so a relay that got as far as binding would fail."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def refuse(env: dict[str, str], prefix: tuple[str, ...] = ()) -> list[str]:
    """The stderr lines of a command that must exit 2 at once."""
    code, stdout, stderr = run_to_exit(env, prefix)
    assert (code, stdout) == (2, ""), stderr
    return stderr.splitlines()


def test_every_problem_is_one_line_in_one_run(tmp_path: Path) -> None:
    with held_port() as port:
        env = relay_env(PGWS_PORT=str(port), PGWS_JWT_SECRET="x" * 20, PGWS_POOL_SIZE="0",
                        PGWS_ROOT_PATH=str(tmp_path / "www"), PGWS_LOG_LEVEL="LOUD")
        del env["PGWS_DB_URI"]
        lines = refuse(env)
    assert lines == [
        "pgws-relay: PGWS_DB_URI: required but not set",
        f"pgws-relay: PGWS_JWT_SECRET: HMAC secret is 20 bytes; {SHORT}",
        f"pgws-relay: PGWS_ROOT_PATH: {str(tmp_path / 'www')!r} does not exist",
        "pgws-relay: PGWS_POOL_SIZE: expected an integer >= 1, got 0",
        "pgws-relay: PGWS_LOG_LEVEL: expected DEBUG, INFO, WARNING or ERROR, got 'LOUD'",
    ]


@pytest.mark.parametrize("kind,length", [("plain", 31), ("base64", 20), ("file", 10),
                                         ("empty", 0)])
def test_hmac_secret_shorter_than_hs256_needs_is_refused(tmp_path: Path, kind: str,
                                                          length: int) -> None:
    raw = b"k" * length
    settings = {"plain": {"PGWS_JWT_SECRET": raw.decode()},
                "empty": {"PGWS_JWT_SECRET": ""},
                "base64": {"PGWS_JWT_SECRET": base64.b64encode(raw).decode(),
                           "PGWS_JWT_SECRET_BASE64": "True"},
                "file": {"PGWS_JWT_SECRET": f"@{tmp_path / 'secret'}"}}[kind]
    (tmp_path / "secret").write_bytes(raw + b"\n")
    with held_port() as port:
        lines = refuse(relay_env(PGWS_PORT=str(port), **settings))
    assert lines == [f"pgws-relay: PGWS_JWT_SECRET: HMAC secret is {length} bytes; {SHORT}"]


def _rejection(relay: RelayProcess, path: str) -> tuple[int, bytes]:
    with pytest.raises(InvalidStatus) as info:
        connect(relay.url(path), open_timeout=10).close()
    return info.value.response.status_code, info.value.response.body


def _accepted(relay: RelayProcess, path: str) -> bool:
    """The handshake succeeds (101); a refusal raises InvalidStatus."""
    with connect(relay.url(path), open_timeout=10, close_timeout=5) as client:
        return client.protocol.state.name == "OPEN"


@pytest.mark.parametrize("length,warning,refused,accepted", [
    (32, "HMAC secret is 32 bytes; HS384 at least 48 and HS512 at least 64, so HS384 and HS512 "
         "tokens will be refused", ["HS384", "HS512"], ["HS256"]),
    (48, "HMAC secret is 48 bytes; HS512 at least 64, so HS512 tokens will be refused",
     ["HS512"], ["HS256", "HS384"]),
    (64, None, [], ["HS256", "HS384", "HS512"]),
], ids=["32-bytes", "48-bytes", "64-bytes"])
@pytest.mark.filterwarnings("ignore:The HMAC key is")  # PyJWT's, on signing the short ones.
def test_a_secret_too_short_for_hs384_or_hs512_starts_with_one_warning(
        start_relay, length: int, warning: str | None, refused: list[str],
        accepted: list[str]) -> None:
    secret = (SECRET * 2)[:length]
    relay = start_relay(PGWS_JWT_SECRET=secret)
    # The warning says what happens: those tokens get upstream's invalid-signature 400.
    for algorithm in refused:
        assert _rejection(relay, f"/c/{token({'mode': 'r'}, secret, algorithm)}") == (
            400, b"Error: JWSError JWSInvalidSignature")
    for algorithm in accepted:
        assert _accepted(relay, f"/c/{token({'mode': 'r'}, secret, algorithm)}")
    relay.signal(signal.SIGTERM)
    assert relay.wait_exit() == 0
    relay.stop()
    lines = [line for line in relay.lines if "PGWS_JWT_SECRET: " in line]
    if warning is None:
        assert lines == []
    else:
        (line,) = lines
        assert line.endswith(" WARNING relay.auth: PGWS_JWT_SECRET: " + warning)
    assert secret not in relay.log


def test_with_workers_the_warning_is_logged_once(start_relay) -> None:
    with held_port() as port:
        pass  # A port that was free a moment ago, for workers that need a fixed one.
    relay = start_relay(wait=False, PGWS_WORKERS="2", PGWS_PORT=str(port))
    first, _ = relay.wait_for_line_at(r"\[worker \d\] .*listening on channel")
    relay.wait_for_line(r"\[worker \d\] .*listening on channel", start=first + 1)
    relay.signal(signal.SIGTERM)
    assert relay.wait_exit() == 0
    relay.stop()
    assert len([line for line in relay.lines if "HS384 and HS512 tokens will be refused" in
                line]) == 1, relay.log


def _without_file_access() -> tuple[str, ...]:
    """A command prefix under which permissions apply, even to root (which bypasses them)."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: every directory is readable")
    return (setpriv, "--bounding-set=-dac_override,-dac_read_search")


@pytest.mark.parametrize("case", ["missing", "file", "unreadable"])
def test_root_path_must_be_a_readable_directory(tmp_path: Path, case: str) -> None:
    path = tmp_path / "www"
    prefix: tuple[str, ...] = ()
    if case == "file":
        path.write_text("<h1>hi</h1>")
    elif case == "unreadable":
        path.mkdir(mode=0o300)  # Files inside could be opened by name, but not listed.
        prefix = _without_file_access()
    problem = {"missing": "does not exist", "file": "is not a directory",
               "unreadable": "permission denied (the directory must be readable and "
                             "searchable)"}[case]
    if case == "unreadable":
        problem = f"cannot use {str(path)!r}: {problem}"
    else:
        problem = f"{str(path)!r} {problem}"
    with held_port() as port:
        lines = refuse(relay_env(PGWS_PORT=str(port), PGWS_ROOT_PATH=str(path)), prefix)
    assert lines == [f"pgws-relay: PGWS_ROOT_PATH: {problem}"]


def test_a_database_that_does_not_exist_is_named_once_as_a_configuration_problem(
        start_relay) -> None:
    # Upstream's semantics stay (retried for the PGWS_RETRIES window, then exit 1), but the log
    # says at once that waiting will not help, and does not repeat the same line each second.
    missing = DB_URI.rsplit("/", 1)[0] + "/pgws_no_such_database"
    relay = start_relay(wait=False, PGWS_DB_URI=missing, PGWS_RETRIES="3")
    assert relay.wait_exit(30) == 1
    relay.stop()
    failures = [line for line in relay.lines if "listener cannot connect" in line]
    assert len(failures) == 1, relay.log
    assert 'database "pgws_no_such_database" does not exist' in failures[0]
    assert failures[0].endswith("this will not pass by itself: check PGWS_DB_URI")
    assert "listener gave up" in relay.log and "Traceback" not in relay.log


def test_an_outage_is_not_called_a_configuration_problem(start_relay) -> None:
    relay = start_relay(wait=False, PGWS_RETRIES="2", PGWS_DB_URI=unreachable_db_uri())
    assert relay.wait_exit(30) == 1
    relay.stop()
    failures = [line for line in relay.lines if "listener cannot connect" in line]
    assert len(failures) == 1 and "Connection refused" in failures[0], relay.log
    assert "check PGWS_DB_URI" not in relay.log
