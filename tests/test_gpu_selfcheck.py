"""The GPU check's own contract (tests/gpu/selfcheck/), on CPU -- here, not in tests/gpu, whose
tests the conftest skips without a GPU: its judgement fails a run that did not train, and the
driver exits non-zero -- the contract the bare GPU machine and .ci/run rely on, with no pytest
there -- when the push delivers a corrupted tensor or a part cannot run. The whole --cpu
rehearsal is .ci/run's `scripts/gpu_check.sh --cpu`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from support.upstream import package_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests/gpu"))

from selfcheck.compare import judge, update_agreement  # noqa: E402
from selfcheck.extract_sglang import extract  # noqa: E402


def test_a_run_whose_weights_did_not_move_fails() -> None:
    init = {"w": torch.zeros(4, 4), "b": torch.zeros(4)}
    ref = {"w": torch.full((4, 4), 0.01), "b": torch.full((4,), 0.01)}
    same = update_agreement(init, ref, ref, torch.float32)
    assert judge(0, same, [1.0], [1.0], True, "fp32")["ok"]
    stuck = update_agreement(init, {"w": ref["w"], "b": init["b"]}, ref, torch.float32)
    verdict = judge(0, stuck, [1.0], [1.0], True, "fp32")
    assert not verdict["ok"] and stuck["not_moved"] == ["b"], verdict
    assert not judge(0, same, [1.0], [1.0], False, "fp32")["ok"]  # non-finite weights


def run_check(tmp_path: Path, sglang: Path, *only: str) -> tuple[int, dict]:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests/gpu")]), "DS_ACCELERATOR": "cpu"}
    args = [a for part in only for a in ("--only", part)]
    p = subprocess.run([sys.executable, "-m", "selfcheck.run", "--cpu", "--sglang", str(sglang),
                        "--out", str(out), "--work", str(tmp_path / "work"), *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return p.returncode, json.loads(out.read_text())


def test_a_corrupted_tensor_fails_the_push_checks(tmp_path: Path) -> None:
    # SGLang's receive loop, then one received tensor changed by one ulp: only the per-tensor
    # checksums can see it (the push itself reports success)
    module = tmp_path / "sglang_update_group.py"
    module.write_text(extract(package_dir("sglang").parent) + """
_receive = WeightUpdater.receive_weights_from_distributed


def _corrupt(self, **kw):
    got = _receive(self, **kw)
    name, t = got[0]
    t.view(-1)[0] = torch.nextafter(t.view(-1)[0], torch.tensor(float("inf"), dtype=t.dtype))
    return got


WeightUpdater.receive_weights_from_distributed = _corrupt
""")
    rc, report = run_check(tmp_path, module, "push")
    assert rc == 1 and not report["ok"]
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) == {"push_new_group", "push_reused_group"}
    for c in checks.values():
        assert c["succeeded"] == ["rollout"] and len(c["checksum_mismatch"]) >= 1, c


def test_a_part_that_cannot_run_is_a_failed_check(tmp_path: Path) -> None:
    # no SGLang module: the receiver exits at once, and the driver sees it (no wait)
    rc, report = run_check(tmp_path, tmp_path / "missing.py", "push")
    assert rc == 1 and [(c["name"], c["ok"]) for c in report["checks"]] == [("push", False)]
    assert "receiver exited" in report["checks"][0]["problems"][0]
