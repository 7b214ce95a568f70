"""A small fleet (two relay hosts behind HAProxy, a private PostgreSQL, network namespaces made
by the test) loses nothing when a relay host dies, and leaves nothing behind.

The larger version, with every fault, is ``bench/scenarios/fleet.py``. Needs root, ``ip``,
``haproxy`` and ``curl``; under CI=true a missing one fails the tests instead of skipping them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bench.parts.fleet_hosts import PREFIX, Fleet, fleet
from bench.scenarios.fleet import Producer, run_fault

#: A fault suite: its own stage in CI (`pytest -m fault`), not the default run.
pytestmark = pytest.mark.fault


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool, package in (("ip", "iproute2"), ("haproxy", "haproxy"), ("curl", "curl")):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install {package})"
    return None


@pytest.fixture(autouse=True)
def _needs_a_fleet() -> None:
    missing = _missing()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"fleet tests need: {missing}")
        pytest.skip(f"fleet tests need: {missing}")


def _leftovers(pid: int) -> list[str]:
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                check=True).stdout.split()
    return ([name for name in namespaces if name.startswith(f"{PREFIX}{pid}-")]
            + [str(path) for path in Path("/tmp").glob(f"pgws-pg-{pid}-*")]
            + [str(path) for path in Path("/tmp").glob(f"{PREFIX}{pid}")])


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_a_relay_host_that_dies_or_drains_loses_and_repeats_nothing(fault: str) -> None:
    with fleet(relays=2) as hosts:
        producer = Producer(hosts.database_uri(), rate=100).start()
        try:
            row = run_fault(hosts, producer, fault, clients=40)
        finally:
            producer.stop()
        assert producer.error is None
    assert row["affected"] > 0  # The relay hit held clients, and they came back.
    assert row["never_received_again"] == 0
    assert (row["missing"], row["duplicated"], row["lost_events"]) == (0, 0, 0), row["gaps"]
    # What the operator saw: the relay gone, marked down, and each moved client resumed.
    assert row["operator"]["ready"] == (0, "")
    assert row["operator"]["marked_down_s"] is not None
    resumed = row["operator"]["resumed_by_end"]
    assert sum(resumed.values()) >= row["affected"], resumed
    assert _leftovers(os.getpid()) == []


def test_a_fleet_that_fails_to_start_leaves_nothing() -> None:
    # A relay that exits at once (a configuration error) fails the set-up half-way.
    broken = Fleet(relays=1, relay_env={"PGWS_MAX_QUEUE_BYTES": "1"})
    with pytest.raises(RuntimeError, match="r1 exited with status 2"):
        broken.open()
    assert _leftovers(os.getpid()) == []
