"""Attacks by a token holder (often only a read token: the Econia recipe hands one to the
public), each reproduced against the real relay, with the bound that now stops it.

Every test here failed before its fix; what each bounds, and the figures before and after, are
in docs/security.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import urllib.request
from pathlib import Path

from websockets.exceptions import ConnectionClosed

from tests.conftest import RelayProcess, eventually, notify, token
from tests.e2e.test_websocket import rejection, ws


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return [child for child in found if _alive(child)]


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return answer.read().decode()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _meta_event(meta, payload: str) -> dict:
    while True:
        message = json.loads(meta.recv(timeout=10))
        if message["payload"] == payload:
            return message


def _delivers(relay: RelayProcess, channel: str = "c") -> None:
    """A new client of ``channel`` receives a notification: the relay serves."""
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    with ws(relay, f"/{channel}/{token({'mode': 'r'})}") as client:
        text = json.dumps({"channel": channel, "n": os.urandom(4).hex()})
        notify(listen, text)
        assert client.recv(timeout=10) == text


# -- a claim with a lone surrogate ---------------------------------------------------------------

def test_a_claim_with_a_lone_surrogate_is_published_escaped_and_the_relay_goes_on(
        start_relay) -> None:
    relay = start_relay(PGWS_META_CHANNEL="meta")
    with ws(relay, f"/meta/{token({'mode': 'r'})}") as meta:
        # What JSON.stringify and json.dumps write for a user-chosen name cut in half.
        with ws(relay, f"/{token({'mode': 'r', 'channels': ['a'], 'name': chr(0xD800)})}"):
            opened = _meta_event(meta, "a")
        closed = _meta_event(meta, "a")
    assert opened["claims"]["name"] == closed["claims"]["name"] == "\ufffd"
    _delivers(relay)
    assert "Traceback" not in relay.log


def test_a_worker_that_dies_is_started_again_and_the_others_keep_their_clients(
        start_relay) -> None:
    port, admin = _free_port(), _free_port()
    relay = start_relay(wait=False, PGWS_WORKERS="2", PGWS_PORT=str(port),
                        PGWS_ADMIN_PORT=str(admin))
    relay.port = port
    first, _ = relay.wait_for_line_at(r"\[worker \d\] .*listening on channel")
    relay.wait_for_line(r"\[worker \d\] .*listening on channel", start=first + 1)
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    assert "pgws_worker_restarts_total 0.0" in _metrics(admin)
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(ws(relay, f"/c/{token({'mode': 'r'})}"))
                   for _ in range(8)]
        workers = _children(relay.proc.pid)
        assert len(workers) == 2
        start = len(relay.lines)
        os.kill(workers[0], signal.SIGKILL)  # As the kernel's OOM killer would.
        relay.wait_for_line(r"worker \d died \(signal 9\); starting it again", start=start)
        relay.wait_for_line(r"\[worker \d\] .*listening on channel", start=start)
        notify(listen, '{"channel":"c","n":1}')
        alive = 0
        for client in clients:
            try:
                assert client.recv(timeout=10) == '{"channel":"c","n":1}'
                alive += 1
            except ConnectionClosed:
                pass  # A client of the killed worker.
        assert 0 < alive < 8
        assert relay.proc.poll() is None
        assert len(eventually(lambda: len(_children(relay.proc.pid)) == 2
                              and _children(relay.proc.pid))) == 2
    for _ in range(8):  # New connections reach both workers again.
        _delivers(relay)
    assert "pgws_worker_restarts_total 1.0" in _metrics(admin)
    relay.signal(signal.SIGTERM)
    assert relay.wait_exit(15) == 0


def test_a_lone_surrogate_claim_with_workers_stops_nothing(start_relay) -> None:
    port = _free_port()
    relay = start_relay(wait=False, PGWS_WORKERS="2", PGWS_PORT=str(port),
                        PGWS_META_CHANNEL="meta")
    relay.port = port
    first, _ = relay.wait_for_line_at(r"\[worker \d\] .*listening on channel")
    relay.wait_for_line(r"\[worker \d\] .*listening on channel", start=first + 1)
    for _ in range(6):  # The kernel spreads them over both workers.
        with ws(relay, f"/{token({'mode': 'r', 'channels': ['a'], 'name': chr(0xDFFF)})}"):
            pass
    _delivers(relay)
    assert "died" not in relay.log and "stopping the others" not in relay.log
    assert relay.proc.poll() is None
    assert rejection(relay, "/a/not-a-token")[0] == 400


def test_workers_end_with_a_supervisor_killed_outright(start_relay) -> None:
    port = _free_port()
    relay = start_relay(wait=False, PGWS_WORKERS="2", PGWS_PORT=str(port))
    first, _ = relay.wait_for_line_at(r"\[worker \d\] .*listening on channel")
    relay.wait_for_line(r"\[worker \d\] .*listening on channel", start=first + 1)
    workers = _children(relay.proc.pid)
    assert len(workers) == 2
    relay.proc.kill()  # SIGKILL: the supervisor cannot pass anything on.
    relay.proc.wait(10)

    eventually(lambda: not any(map(_alive, workers)), what="the workers to end")
    with socket.socket() as probe:  # Nothing holds the port any more.
        assert probe.connect_ex(("127.0.0.1", port)) != 0
