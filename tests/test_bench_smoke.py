"""The benchmark harness works (not a speed check): the smallest burst, relay and ceiling."""

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
