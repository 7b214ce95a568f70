"""The raw-socket fuzzer (``bench/reliability/fuzz.py``) at a CI-sized count, against the real
command.

Every case must get one of its family's documented answers (HTTP status or close code), a
normal client must keep making round trips, and no task or file descriptor may be left over.
``python -m bench.reliability.fuzz`` runs the same at 100,000 cases.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.parts.harness import free_port
from bench.reliability import fuzz

#: A fault suite: its own stage in CI (`pytest -m fault`), not the default run.
pytestmark = pytest.mark.fault


def test_raw_socket_fuzz_gets_documented_answers_and_leaks_nothing(start_relay,
                                                                  tmp_path: Path) -> None:
    admin_port = free_port()
    relay = start_relay(**fuzz.relay_env(fuzz.make_root(str(tmp_path)), admin_port))
    result = fuzz.fuzz(relay, admin_port, cases=500, procs=2, seed=2026, check_every=100)
    assert result["failures"] == []
    assert result["round_trips_ok"] and result["round_trips"] == 6
    assert result["leak_free"], (result["before"], result["after"])
    assert relay.proc.poll() is None
    assert "Traceback" not in relay.log
    # Every family ran (500 cases over 32 families).
    assert {key.split(":")[0] for key in result["tally"]} == set(fuzz.FAMILIES)
