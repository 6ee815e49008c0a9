"""configs/paper/: the paper's Qwen3-4B-Base runs (RLRT and its GRPO / RLSD baselines) load
through the real config models and carry the paper's settings (docs/algorithm.md, docs/reproduce.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlrt.config import SECTION_MODELS as SECTIONS
from rlrt.config import load_section

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
RUNS = ("rlrt", "grpo", "rlsd")


@pytest.fixture(autouse=True)
def _no_env_overrides(monkeypatch):
    import os

    for var in list(os.environ):
        if var.startswith("RLRT_") or var == "REDIS_URL":
            monkeypatch.delenv(var)


def section(run: str, name: str):
    return load_section(name, str(PAPER / f"{run}.yaml"))


def test_the_three_runs_exist():
    assert sorted(p.stem for p in PAPER.glob("*.yaml")) == sorted(RUNS)


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("name", list(SECTIONS))
def test_every_section_loads(run, name):
    section(run, name)


@pytest.mark.parametrize("run", RUNS)
def test_paper_hyper_parameters(run):
    t = section(run, "trainer")
    assert (t.lr, t.weight_decay, t.warmup_steps) == (1e-6, 0.01, 10)
    assert t.sampling.temperature == 1.0 and t.sampling.top_p == 1.0
    assert t.group_size == 8
    # the paper's stack (verl): 256 prompts x 8, PPO mini-batches of 128 prompts (inferred)
    assert (t.prompts_per_step, t.ppo_mini_batch_size, t.ppo_epochs) == (256, 128, 1)
    assert t.zero_variance == "keep"  # verl's GRPO
    a = t.algorithm
    assert (a.clip_eps_low, a.clip_eps_high, a.kl_coef) == (0.2, 0.28, 0.0)
    assert a.preset == run
    assert t.data.source == "jsonl" and t.data.path
    assert t.model_path.endswith("Qwen3-4B-Base")
    assert section(run, "run").bootstrap is False


def test_algorithms():
    rlrt = section("rlrt", "trainer").algorithm
    assert (rlrt.teacher_weight, rlrt.weight_gate, rlrt.lam, rlrt.eps_w) == ("reversed", "correct", 0.5, 1.0)
    assert rlrt.lam_schedule == "constant" and rlrt.context_mode == "sibling"
    assert rlrt.model_kind == "base" and rlrt.teacher_version_rule == "match_s"
    assert section("grpo", "trainer").algorithm.uses_teacher is False
    rlsd = section("rlsd", "trainer").algorithm
    assert (rlsd.teacher_weight, rlsd.weight_gate, rlsd.eps_w) == ("teacher", "all", 0.2)
    assert (rlsd.lam, rlsd.lam_schedule, rlsd.lam_decay_steps) == (0.5, "linear_decay", 50)
    assert rlsd.context_mode == "reference_answer"


def _comparable(run: str) -> dict:
    out = {}
    for name in SECTIONS:
        d = section(run, name).model_dump()
        if name == "trainer":
            d.pop("algorithm")
        out[name] = d
    return out


def _strip_names(d, run: str):
    if isinstance(d, dict):
        return {k: _strip_names(v, run) for k, v in d.items()}
    if isinstance(d, list):
        return [_strip_names(v, run) for v in d]
    return d.replace(f"{run}-qwen3", "RUN-qwen3") if isinstance(d, str) else d


@pytest.mark.parametrize("run", ["grpo", "rlsd"])
def test_baselines_differ_from_rlrt_only_in_algorithm_and_names(run):
    """A fair comparison: same data, model, batch, optimizer, sampling and topology."""
    assert _strip_names(_comparable(run), run) == _strip_names(_comparable("rlrt"), "rlrt")
