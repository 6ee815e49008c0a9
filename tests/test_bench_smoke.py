"""The benchmarks run (tiny settings, nothing recorded): timing goals live in bench/, and
what a test can check is that each script still works end to end and prints its JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_e2e_runs_both_sides_and_reports_the_limit():
    pytest.importorskip("trl", reason="bench extra not installed (pip install --no-deps trl accelerate)")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "e2e.py"), "--rounds", "1",
                          "--ours-steps", "5", "--trl-steps", "3", "--trl-default-steps", "0",
                          "--skip", "1", "--no-record"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["bench"] == "e2e" and result["ours"] > 0 and result["reference"] > 0
    assert "core limit" in lines[-2]
    assert "Ours against this machine's limit: **" in out.stderr  # the report body (not recorded)
    assert "the update fixed at 1 thread" in out.stderr
