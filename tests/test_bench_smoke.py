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
    """The replay part, small (``--quick``): exact, then live. (The other parts are left to
    ``python bench/resume.py --quick``; what they check is tested end to end in
    test_e2e_resume.py and test_subscription.py.)"""
    out = tmp_path / "resume.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "resume.py"), "--quick", "--parts",
         "replay", "--json", str(out)],
        capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    data = json.loads(out.read_text())
    parts = data["parts"]
    assert data["complete"]
    (run,) = parts["replay"]["runs"]
    assert run["exactly_once_in_order"] and run["live_after_replay"], run
    assert {row["goal"] for row in data["goals"]} == {"2"}
