"""The worked example a user copies (examples/byo/): their model directory, the shipped maths
JSONL, their reward file and a YAML of at most 15 lines. The default suite checks that it
resolves (config, data, reward, eval set); the slow tests run it for a few steps on the CPU
and check that `rlrt eval --model DIR` scores exactly DIR."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rlrt.config import load_all
from rlrt.data.arith import generate
from rlrt.run_config import eval_sets
from tasks.data import load_rows
from tasks.rewards import load_fn

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "byo"
CONFIG = EXAMPLE / "config.yaml"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the example's paths are relative to where rlrt runs


def test_example_is_short_and_resolves() -> None:
    lines = [ln for ln in CONFIG.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(lines) <= 15
    cfg = load_all(str(CONFIG))
    model = yaml.safe_load(CONFIG.read_text())["model"]
    assert cfg["trainer"].model_path == model
    assert cfg["rollout"].engine.model_path == cfg["teacher"].engine.model_path == model
    rows = load_rows(cfg["trainer"].data, seed=0)
    assert len(rows) == 128 and all(r.task == "math" and r.answer.isdigit() for r in rows)
    (test,) = eval_sets(cfg.raw.get("eval"), cfg["run"], cfg["trainer"].data)
    assert test.every > 0 and load_rows(test.data_config(cfg["trainer"].data), seed=0)
    terms = dict(cfg["reward"].spec()[0])
    assert terms["task"] == 1.0 and terms["examples/byo/reward.py:boxed_once"] == 0.1


def test_example_reward_gives_partial_credit() -> None:
    fn = load_fn("examples/byo/reward.py:boxed_once")
    assert fn("so the answer is \\boxed{8}.", "8", {}) == 1.0
    assert fn("\\boxed{8} or \\boxed{9}", "8", {}) == 0.0
    assert fn("8", "8", {}) == 0.0


def test_shipped_data_is_what_the_project_generates() -> None:
    shipped = [json.loads(ln) for ln in (EXAMPLE / "maths.jsonl").read_text().splitlines()]
    assert shipped == generate(128, 0)
    test = [json.loads(ln) for ln in (EXAMPLE / "maths-test.jsonl").read_text().splitlines()]
    assert test == generate(32, 1)


# --------------------------------------------------------------------------- slow: real runs


def tiny_model(out: Path, *, always: str | None = None) -> Path:
    """A tiny Qwen3 with the bootstrap tokenizer. With `always`, it emits that one token
    whatever the context: every layer's output projections are zero, so the last hidden
    state is the token's embedding, whose dimension 0 is 1 for every token; the final norm
    keeps only that dimension and the (untied) head maps it to `always`."""
    from trainer.bootstrap.model import build_model
    from trainer.bootstrap.tokenizer import build_tokenizer

    tok = build_tokenizer()
    model = build_model(tok, seed=0, hidden=32, layers=1, heads=2, kv_heads=1)
    if always is not None:
        with torch.no_grad():
            model.config.tie_word_embeddings = False
            model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.lm_head.weight))
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            model.model.embed_tokens.weight[:, 0] = 1.0
            model.model.norm.weight.zero_()
            model.model.norm.weight[0] = 1.0
            model.lm_head.weight[tok.convert_tokens_to_ids(always), 0] = 100.0
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _cli(*args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlrt.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _small(tmp_path: Path, name: str) -> list[str]:
    """--set overrides that make a run of the example small and private to this test."""
    sets = [f"run.dir={tmp_path / 'run'}", f"bus.prefix={name}", "verifier.port=0",
            "rollout.port=0", "teacher.port=0", "verifier.workers=1",
            "rollout.engine.cpu.num_threads=1", "teacher.engine.cpu.num_threads=1"]
    return [x for s in sets for x in ("--set", s)]


@pytest.mark.slow
def test_example_trains_a_few_steps_on_cpu(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "my-model")
    run = tmp_path / "run"
    sets = [f"model={model}", f"trainer.output_dir={run / 'trainer'}", "trainer.total_steps=2",
            "trainer.prompts_per_step=2", "trainer.sampling.max_new_tokens=12",
            "trainer.torch_threads=1", "trainer.zero_variance=keep", "trainer.micro_batch_size=8",
            'eval=[{name: test, data: {path: examples/byo/maths-test.jsonl}, n: 3, k: 2, '
            'every: 1, max_new_tokens: 8}]']
    res = _cli("train", "-c", str(CONFIG), *_small(tmp_path, "byo-train"),
               *[x for s in sets for x in ("--set", s)])
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [json.loads(ln) for ln in (run / "trainer" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [0, 1]
    evals = [json.loads(ln) for ln in (run / "eval.jsonl").read_text().splitlines()]
    assert {(e["set"], e["label"]) for e in evals} >= {("test", "before training"),
                                                      ("test", "after training")}
    assert all(e["n_prompts"] == 3 and e["k"] == 2 for e in evals)
    report = json.loads((run / "report.json").read_text())
    assert report["eval_after"]["engine_version"] >= 1  # the trained weights were evaluated
    assert "| test | step |" in (run / "report.md").read_text()


@pytest.mark.slow
def test_eval_model_scores_exactly_that_model(tmp_path: Path) -> None:
    """Two models that differ only in what they answer: each gets its own score, whatever
    the config's model is (the config names neither). Graded by a task of the user's own,
    named by dotted path (the verifier imports it from PYTHONPATH)."""
    data = tmp_path / "sevens.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say seven ({i}).", "answer": "7"}) + "\n"
                            for i in range(3)))
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    scores = {}
    for digit in ("7", "3"):
        model = tiny_model(tmp_path / f"says-{digit}", always=digit)
        out = tmp_path / f"eval-{digit}.json"
        res = _cli("eval", "-c", str(CONFIG), "--model", str(model), "--data", str(data),
                   "--task", "support.inspect_task:ContainsTask", "--k", "2",
                   "--max-new-tokens", "1", "--temperature", "1.0", "--out", str(out),
                   *_small(tmp_path / digit, f"byo-eval-{digit}"), env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        scores[digit] = json.loads(out.read_text())["sevens"]["avg@2"]
    assert scores == {"7": 1.0, "3": 0.0}
