"""``pgws-relay tail`` as an operator runs it: a subprocess against the real relay."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator

import pytest

from relay.cli import main
from relay.wire.positions import parse_position
from tests.helpers import (
    RELAY,
    TIMEOUT,
    Lines,
    RelayProcess,
    notify,
    sigint_as_from_a_terminal,
    token,
    unique_channel,
)


class Tail:
    """A running ``pgws-relay tail``: its stdout and stderr lines as they come."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([RELAY, "tail", *args], env={**os.environ, **(env or {})},
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     preexec_fn=sigint_as_from_a_terminal)
        self.out, self.err = Lines(), Lines()
        self._readers = [self.out.read_from(self.proc.stdout),
                         self.err.read_from(self.proc.stderr)]

    def wait_err(self, text: str) -> None:
        self.err.wait_for(lambda: any(text in line for line in self.err.items),
                          what=f"{text!r} on stderr")

    def wait_out(self, count: int) -> list[str]:
        self.out.wait_for(lambda: len(self.out.items) >= count, what=f"{count} lines")
        return self.out.items[:count]

    def stop(self, signum: int) -> int:
        """Send ``signum``; the exit status, once every line it wrote has been read."""
        self.proc.send_signal(signum)
        status = self.proc.wait(TIMEOUT)
        for reader in self._readers:
            reader.join(TIMEOUT)
        return status


@pytest.fixture
def tails() -> Iterator[list[Tail]]:
    started: list[Tail] = []
    yield started
    for tail in started:
        tail.proc.kill()
        tail.proc.wait(TIMEOUT)


def test_tail_prints_lines_resumes_from_a_position_and_reports_expiry(
        start_relay: Callable[..., RelayProcess], tails: list[Tail]) -> None:
    relay: RelayProcess = start_relay(PGWS_HISTORY_MESSAGES="5")
    listen, channel = relay.env["PGWS_LISTEN_CHANNEL"], unique_channel()
    jwt_text = token({"mode": "r", "channel": channel})
    env = {"PGWS_TOKEN": jwt_text}
    url = relay.url(f"/{channel}")

    def send(*numbers: int) -> list[str]:
        payloads = [json.dumps({"channel": channel, "payload": n}) for n in numbers]
        notify(listen, *payloads)
        return payloads

    first = Tail(url, env=env)
    tails.append(first)
    first.wait_err("connected to")
    sent = send(0, 1)
    assert first.wait_out(2) == sent
    assert first.stop(signal.SIGINT) == 0
    resume = first.err.items[-1].rsplit("--from ", 1)[-1]
    assert first.err.items[-1].startswith("pgws-relay tail: stopped; resume with --from ")
    assert parse_position(resume) is not None
    assert not any(jwt_text in line for line in first.err.items)

    missed = send(2, 3)  # While nobody tails.
    second = Tail(url, "--from", resume, "--positions", env=env)
    tails.append(second)
    lines = second.wait_out(2)
    assert [line.split("\t", 1)[1] for line in lines] == missed
    positions = [line.split("\t", 1)[0] for line in lines]
    assert all(parse_position(position) for position in positions)
    assert second.stop(signal.SIGTERM) == 0
    assert second.err.items[-1].endswith(f"resume with --from {positions[-1]}")

    send(*range(4, 14))  # Past the history of five: resuming after 3 cannot be lossless.
    third = Tail(url, "--token", jwt_text, "--from", positions[-1], env={"PGWS_TOKEN": ""})
    tails.append(third)
    third.wait_err("lost (expired)")
    assert third.err.items[-1].startswith("pgws-relay tail: lost (expired): messages may be "
                                          "missing; going on after ")
    assert send(99) == third.wait_out(1)  # The stream goes on after the gap.
    assert third.stop(signal.SIGTERM) == 0


def test_tail_refused_exits_1_with_the_relays_answer(relay: RelayProcess) -> None:
    channel = unique_channel()
    expired = token({"mode": "r", "channel": channel, "exp": 1})
    result = subprocess.run([RELAY, "tail", relay.url(f"/{channel}"), "--token", expired],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == "pgws-relay tail: refused: HTTP 400: Token expired"
    assert expired not in result.stderr


@pytest.mark.parametrize("args", [
    [],
    ["http://127.0.0.1:1/chat"],
    ["ws://127.0.0.1:1/chat", "--from", "yesterday"],
    ["ws://127.0.0.1:1/chat?from=00000001.1.0000000000000001"],
    ["ws://127.0.0.1:1/chat", "--bogus"],
])
def test_tail_bad_arguments_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["tail", *args])
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "pgws-relay tail: error:" in err
