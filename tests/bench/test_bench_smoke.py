"""The benchmark scripts work (not a speed check): the smallest burst (relay and ceiling), a
short churn run, the replay part of the resume script, the hub's micro-benchmark at a tiny size,
and PostgreSQL's bytes per queue entry (bench/scenarios/pglimits.py's cheapest part, on a
private cluster). The fuzzer runs in tests/e2e/test_fuzz.py. All but the micro-benchmark run in
CI's second stage (``slow``): each starts the scripts' own processes."""

from __future__ import annotations

import glob
import json
import os
import pwd
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_smallest_burst_runs_and_delivers_everything(tmp_path: Path) -> None:
    out = tmp_path / "burst.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.scenarios.throughput", "burst", "--quick", "--runs", "1",
         "--servers", "relay,ceiling", "--json", str(out)], cwd=ROOT,
        capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    (case,) = data["cases"]
    for name in ("relay", "ceiling"):
        (sample,) = case["servers"][name]
        assert sample.get("delivered_share") == 1, sample
        assert sample["deliveries_per_s"] > 0


@pytest.mark.slow
def test_churn_script_runs_and_finds_no_leak(tmp_path: Path) -> None:
    out = tmp_path / "churn.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.reliability.churn", "--cycles", "400", "--procs", "2",
         "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=240,
        stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["ok"] and data["tasks"][1] <= data["tasks"][0]


@pytest.mark.slow
def test_resume_script_runs_and_loses_nothing(tmp_path: Path) -> None:
    """The replay part, small (``--quick``): exact, then live. (The other parts are left to
    ``python -m bench.scenarios.resume --quick``; what they check is tested end to end in
    test_e2e_resume.py and test_subscription.py.)"""
    out = tmp_path / "resume.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.scenarios.resume", "--quick", "--parts", "replay",
         "--json", str(out)], cwd=ROOT,
        capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    data = json.loads(out.read_text())
    parts = data["parts"]
    assert data["complete"]
    (run,) = parts["replay"]["runs"]
    assert run["exactly_once_in_order"] and run["live_after_replay"], run
    assert {row["goal"] for row in data["goals"]} == {"2"}


def test_hub_micro_benchmark_runs_and_reports_every_case(tmp_path: Path) -> None:
    """``python -m bench.micro.hub`` at a tiny size (well under 2 s): a figure for each case,
    and the deliveries the hub counted. Numbers only; no timing is asserted."""
    out = tmp_path / "micro-hub.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.micro.hub", "--clients", "20", "--batch", "10",
         "--repeats", "3", "--json", str(out)], cwd=ROOT,
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["commit"] and data["command"].startswith("python -m bench.micro.hub")
    cases = {row["case"]: row for row in data["cases"]}
    assert set(cases) == {"plain", "filtered", "history", "positioned"}
    for row in cases.values():
        assert row["us_per_notification"] > 0 and row["ns_per_delivery"] > 0, row
    # 20 clients × 10 notifications; the filtered case's 10 markets give each a tenth.
    assert cases["plain"]["deliveries_per_batch"] == 200
    assert cases["filtered"]["deliveries_per_batch"] == 20


@pytest.mark.slow
def test_connection_memory_micro_benchmark_says_where_each_connection_goes() -> None:
    """``python -m bench.micro.connection_memory`` at a tiny size: the per-connection line and
    a table of source lines that includes the connection's own object."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.micro.connection_memory", "--low", "20", "--high", "120",
         "--top", "40"], cwd=ROOT, capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "100 connections added (20 -> 120): RSS" in result.stdout, result.stdout
    assert "relay/transports/server.py" in result.stdout, result.stdout


def _no_private_cluster() -> str | None:
    """Why bench/parts/pgcluster.py cannot make a cluster here, or None."""
    if os.geteuid() != 0:
        return "a private PostgreSQL cluster needs root"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no postgres user (Debian's postgresql package)"
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        return "initdb not found under /usr/lib/postgresql (Debian's postgresql package)"
    return None


@pytest.mark.slow
def test_pglimits_script_measures_queue_entries_and_leaves_no_cluster(tmp_path: Path) -> None:
    """``--quick --parts entries``: a private cluster, a pinned queue, a few hundred
    notifications per payload size (seconds). Under CI=true a missing cluster fails it."""
    missing = _no_private_cluster()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"bench/scenarios/pglimits.py needs: {missing}")
        pytest.skip(f"bench/scenarios/pglimits.py needs: {missing}")
    out = tmp_path / "pglimits.json"
    script = subprocess.Popen(
        [sys.executable, "-m", "bench.scenarios.pglimits", "--quick", "--parts", "entries",
         "--json", str(out)], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        stdout, stderr = script.communicate(timeout=120)
    finally:
        script.kill()
        script.wait()
    assert script.returncode == 0, stdout[-2000:] + stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["quick"] and data["postgres"]["fsync"] == "on"
    sizes = {row["payload_bytes"]: row for row in data["entry_sizes"]}
    # 16 bytes + "pglimits\0" + 100 + 1, aligned to 4: 128, so 64 entries fill an 8 KiB page.
    assert sizes[100]["entry_bytes"] == 128
    assert sizes[100]["measured_bytes_per_notification"] == 128
    assert data["summary"] == [] and "stalls" not in data and "fill" not in data
    leftovers = glob.glob(os.path.join(tempfile.gettempdir(), f"pgws-pg-{script.pid}-*"))
    assert not leftovers, leftovers
