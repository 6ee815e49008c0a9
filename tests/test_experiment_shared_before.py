"""`rlrt experiment` measures the before-training evaluation once: every run starts from the same
model and evaluates the same held-out prompts with the same sampling seed, so the first run
measures it and the later runs reuse it (logged as reused in their eval.jsonl, the same numbers
in their report) instead of spending minutes each on an identical measurement."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from support.tiny_model import save_bootstrap_model
from test_e2e_train import write_config

from rlrt.experiment import run_experiment


def _eval_rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]


def report_before(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())["eval_before"]


def test_second_run_reuses_the_first_runs_before_evaluation(tmp_path: Path) -> None:
    model = save_bootstrap_model(tmp_path / "model")
    cfg = write_config(tmp_path, model, total_steps=1)
    out = tmp_path / "study"
    run_experiment(cfg, ["grpo", "rlrt"], [0], out, console=Console(quiet=True))

    first, second = _eval_rows(out / "grpo-s0"), _eval_rows(out / "rlrt-s0")
    # the first run measured both points; the second measured only the one after training
    assert [(r["step"], "reused" in r) for r in first] == [(0, False), (1, False)]
    assert [(r["step"], "reused" in r) for r in second] == [(0, True), (1, False)]
    before = {k: v for k, v in second[0].items() if k != "reused"}
    assert before == first[0]
    results = [json.loads((out / f"{p}-s0" / "result.json").read_text()) for p in ("grpo", "rlrt")]
    assert results[0]["before"] == results[1]["before"] == report_before(out / "grpo-s0")
    assert all(r["after"]["n_prompts"] == 4 for r in results)
