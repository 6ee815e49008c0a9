"""TrainerConfig: YAML section + env overrides, validation naming the field, lr schedule."""

from __future__ import annotations

import pytest

from protocol.config import ConfigError
from trainer.config import TrainerConfig
from trainer.model import lr_lambda

YAML = """
trainer:
  model_path: /models/tiny
  algorithm: {preset: rlrt, eps_w: 0.5, teacher_version: any}
  prompts_per_step: 4
  push:
    every: 2
    services: [{name: rollout, url: "http://127.0.0.1:1"}]
"""


def test_yaml_section_and_nested_env_overrides(tmp_path, monkeypatch):
    f = tmp_path / "run.yaml"
    f.write_text(YAML)
    monkeypatch.setenv("RLRT_TRAINER__ALGORITHM__LAM", "0.3")
    monkeypatch.setenv("RLRT_TRAINER__PUSH__EVERY", "5")
    cfg = TrainerConfig.load(f)
    assert cfg.model_path == "/models/tiny"
    assert cfg.prompts_per_step == 4
    # the preset's knobs, the YAML's override and the env's override all apply
    assert cfg.algorithm.teacher_weight == "reversed"
    assert cfg.algorithm.eps_w == 0.5
    assert cfg.algorithm.lam == 0.3
    assert cfg.push.every == 5
    assert cfg.push.services[0].name == "rollout"
    # the trainer stamps the preset's teacher scope into every PromptTask
    assert cfg.algorithm.teacher_request().scope == "correct_mixed"


def test_bad_values_name_the_field(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("trainer: {model_path: /m, zero_stage: 1}\n")
    with pytest.raises(ConfigError, match="trainer.zero_stage"):
        TrainerConfig.load(f)
    f.write_text("trainer: {model_path: /m, push: {mode: nccl, services: [{name: r, url: u}]}}\n")
    with pytest.raises(ConfigError, match="needs engine"):
        TrainerConfig.load(f)
    f.write_text("trainer: {model_path: /m, no_such_knob: 1}\n")
    with pytest.raises(ConfigError, match="no_such_knob"):
        TrainerConfig.load(f)


def test_lr_schedule_warmup_then_decay():
    cfg = TrainerConfig(model_path="/m", warmup_steps=4, total_steps=14, lr_schedule="cosine",
                        min_lr_ratio=0.1)
    f = lr_lambda(cfg)
    assert [f(s) for s in range(4)] == [0.0, 0.25, 0.5, 0.75]  # verl's: step 0 at lr 0
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert f(14) == pytest.approx(0.1)
    assert f(100) == pytest.approx(0.1)
    const = lr_lambda(TrainerConfig(model_path="/m", warmup_steps=0, total_steps=10))
    assert {const(s) for s in range(10)} == {1.0}


def test_algorithm_consistency_is_checked_at_config_time():
    """Fail loudly: a teacher preset sampling at T != 1 (q_t is scored at T = 1), a
    current-policy teacher that can never match s_t (push.every > 1), an unknown estimator."""
    base = {"model_path": "/m", "algorithm": {"preset": "rlrt"}}
    with pytest.raises(ValueError, match="teacher_temperature"):
        TrainerConfig(**base, sampling={"temperature": 0.7})
    ok = TrainerConfig(**{**base, "algorithm": {"preset": "rlrt", "teacher_temperature": 1.0}},
                       sampling={"temperature": 0.7})
    assert ok.algorithm.teacher_temperature == 1.0
    TrainerConfig(model_path="/m", sampling={"temperature": 0.7})  # grpo: no teacher, fine
    with pytest.raises(ValueError, match="servable|temperature 1"):
        TrainerConfig(**{**base, "algorithm": {"preset": "rlrt", "teacher_temperature": 0.7}})
    with pytest.raises(ValueError, match="push.every: 1"):
        TrainerConfig(**base, push={"every": 2})
    assert TrainerConfig(**base).algorithm.teacher_version_rule == "match_s"
    assert TrainerConfig(model_path="/m").algorithm.teacher_version_rule == "any"
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        TrainerConfig(model_path="/m", algorithm={"advantage": "nope"})


@pytest.mark.parametrize("kind, preset, eps_w", [
    ("base", "rlrt", 1.0), ("instruct", "rlrt", 0.5), ("thinking", "rlrt", 0.2),
    ("base", "rlsd", 1.0), (None, "rlsd", 0.2), (None, "rlrt", 1.0)])
def test_model_kind_sets_the_papers_eps_w(kind, preset, eps_w):
    from trainer.algorithm import AlgorithmConfig

    over = {"model_kind": kind} if kind else {}
    assert AlgorithmConfig.from_preset(preset, **over).eps_w == eps_w
    # an explicit eps_w still wins over the kind
    assert AlgorithmConfig.from_preset(preset, model_kind="thinking", eps_w=0.7).eps_w == 0.7


def test_zero_variance_default_is_verls_keep():
    assert TrainerConfig(model_path="/m").zero_variance == "keep"
