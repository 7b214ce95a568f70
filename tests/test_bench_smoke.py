"""The benchmark scripts work (not a speed check): the smallest burst (relay and ceiling), and
a short churn run. The fuzzer runs in tests/test_fuzz.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_smallest_burst_runs_and_delivers_everything(tmp_path: Path) -> None:
    out = tmp_path / "burst.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "burst", "--quick", "--runs", "1",
         "--servers", "relay,ceiling", "--json", str(out)],
        capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    (case,) = data["cases"]
    for name in ("relay", "ceiling"):
        (sample,) = case["servers"][name]
        assert sample.get("delivered_share") == 1, sample
        assert sample["deliveries_per_s"] > 0


def test_churn_script_runs_and_finds_no_leak(tmp_path: Path) -> None:
    out = tmp_path / "churn.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "churn.py"), "--cycles", "400", "--procs", "2",
         "--json", str(out)], capture_output=True, text=True, timeout=240,
        stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["ok"] and data["tasks"][1] <= data["tasks"][0]


def test_resume_script_runs_and_loses_nothing(tmp_path: Path) -> None:
    """The alternating-relays and replay parts, small (``--quick``): the reconnects lose and
    repeat nothing, the replay is exact. (The burst and memory parts are left to
    ``python bench/resume.py --quick``: the suite's time goes to what can break.)"""
    out = tmp_path / "resume.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "resume.py"), "--quick", "--parts",
         "alternate,replay", "--json", str(out)],
        capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    data = json.loads(out.read_text())
    parts = data["parts"]
    assert data["complete"]
    part = parts["alternate"]
    assert "error" not in part, part
    assert part["lost"] == part["duplicated"] == part["out_of_order"] == 0, part
    assert part["resets"] > 0 and part["resumes"] > 0, part
    assert min(part["per_relay_connections"]) > 0
    (run,) = parts["replay"]["runs"]
    assert run["exactly_once_in_order"] and run["live_after_replay"], run
    assert {row["goal"] for row in data["goals"]} == {"1", "2"}
