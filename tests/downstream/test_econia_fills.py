"""examples/econia_fills.py: one market's fills, each exactly once, across a relay restart."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.downstream.test_econia import ECONIA_SECRET, econia_db, run_sql  # noqa: F401 (a fixture)
from tests.helpers import TIMEOUT, Lines, RelayProcess, sigint_as_from_a_terminal, token

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "econia_fills.py"


def fill(txn_version: int, event_idx: int, market: int = 7, twin: bool = False) -> str:
    """A fill_events row; ``twin``: the copy emitted to the taker's handle."""
    emit = "0xbb" if twin else "0xaa"
    return (f"INSERT INTO fill_events VALUES ({txn_version}, {event_idx}, '{emit}', "
            f"'2024-01-02 03:04:05+00', '0xaa', 0, 1, true, {market}, {1000 + txn_version}, 1, "
            f"{txn_version}, '0xbb', 1, 2, 3)")


@pytest.mark.slow
def test_example_applies_every_fill_once_across_a_relay_restart(
        start_relay: Callable[..., RelayProcess], econia_db: str) -> None:  # noqa: F811
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    settings = {"PGWS_DB_URI": econia_db, "PGWS_JWT_SECRET": ECONIA_SECRET,
                "PGWS_LISTEN_CHANNEL": "econiaws", "PGWS_PORT": port}
    relay = start_relay(**settings)
    run_sql(econia_db, fill(100, 0))  # Before the example starts: history, not printed.
    env = {**os.environ,
           "PGWS_TOKEN": token({"mode": "r", "channels": ["fill_event"]}, ECONIA_SECRET)}
    example = subprocess.Popen(
        [sys.executable, str(EXAMPLE), f"ws://127.0.0.1:{port}", econia_db, "--market", "7"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=sigint_as_from_a_terminal)
    out, err = Lines(), Lines()
    out.read_from(example.stdout)
    err.read_from(example.stderr)
    try:
        err.wait_for(lambda: any("following market 7 after 100:0" in line for line in err.items),
                     what="the example to connect")
        run_sql(econia_db, fill(101, 0), fill(101, 1, market=8), fill(101, 2, twin=True))
        run_sql(econia_db, fill(102, 0))
        out.wait_for(lambda: len(out.items) >= 2, what="two live fills")
        relay.stop()
        run_sql(econia_db, fill(103, 0), fill(103, 1, twin=True))  # While no relay runs.
        run_sql(econia_db, fill(104, 0))
        start_relay(**settings)  # A new process: it knows nothing of the old positions.
        err.wait_for(lambda: any("lost (unknown)" in line for line in err.items),
                     what="the example to hear that it lost messages")
        run_sql(econia_db, fill(105, 0))
        out.wait_for(lambda: len(out.items) >= 5, what="five fills")
    finally:
        example.send_signal(signal.SIGINT)
        example.wait(TIMEOUT)
    keys = [line.split()[0] for line in out.items]
    assert keys == ["101:0", "102:0", "103:0", "104:0", "105:0"], "\n".join(err.items)
    assert out.items[0] == "101:0 price=1101 size=101 live"
    # 103 and 104 were committed while no relay ran: only the database had them. (105 comes
    # live, or from the catch-up if it ran after the commit; the live copy is then skipped.)
    assert [line.split()[-1] for line in out.items[:4]] == ["live", "live", "database",
                                                            "database"]
