"""`rlrt export`: real DeepSpeed checkpoints (ZeRO 0 and 3, the latest and an intermediate one)
and a pushed weight directory become HF model directories that transformers loads with exactly
the trained weights; the `vllm` test serves one with the real vLLM server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.tiny_model import save_tiny_policy
from support.update_case import case_batch, case_config
from support.vllm_server import HAVE_VLLM, vllm_server
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from protocol.weights import save_weights_dir
from rlrt.cli import app
from rlrt.export import ExportError, export_checkpoint
from tasks.base import render_prompt
from trainer import dist
from trainer.checkpoint import Checkpointer
from trainer.model import build_policy, full_state_dict
from trainer.update import update_step

# head_dim 64 (hidden 256, 4 heads): a size vLLM's CPU attention takes.
HIDDEN = 256


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return save_tiny_policy(tmp_path_factory.mktemp("base"), hidden=HIDDEN)


def train_run(base: Path, out: Path, stage: int) -> dict[int, dict[str, torch.Tensor]]:
    """Two RL steps with a checkpoint after each, as the trainer lays them out (its saved
    config beside them); returns the full weights after each step."""
    cfg = case_config(base, zero_stage=stage, output_dir=str(out))
    out.mkdir(parents=True)
    (out / "trainer_config.json").write_text(cfg.model_dump_json(indent=1))
    rank, world = dist.setup("cpu", 120)
    policy = build_policy(cfg, rank=rank, world_size=world, device="cpu")
    ckpt = Checkpointer(out / "checkpoints", keep=2)
    weights = {}
    for step in (1, 2):
        update_step(policy, case_batch(), cfg.algorithm, step=step - 1, micro_batch_size=3)
        ckpt.save(policy, step, {})
        weights[step] = full_state_dict(policy)
    return weights


def assert_loads_with(out: Path, expected: dict[str, torch.Tensor], base: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(out)
    got = model.state_dict()
    for name, t in expected.items():
        assert torch.equal(got[name], t), name
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    tok, ref = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(base)
    msgs = [{"role": "user", "content": "Make 24 from 3 5 7 9."}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True) == \
        ref.apply_chat_template(msgs, add_generation_prompt=True)


@pytest.mark.parametrize("stage", [0, 3])
def test_latest_and_intermediate_checkpoints(base_dir: Path, tmp_path: Path, stage: int) -> None:
    run = tmp_path / "trainer"
    weights = train_run(base_dir, run, stage)
    assert any(not torch.equal(weights[1][n], weights[2][n]) for n in weights[1])  # two distinct states
    # the output_dir: its latest checkpoint
    res = export_checkpoint(run, tmp_path / "hf-latest")
    assert res.kind == "deepspeed" and res.source.name == "step-00000002"
    assert res.base_model == str(base_dir)
    assert_loads_with(tmp_path / "hf-latest", weights[2], base_dir)
    # an intermediate checkpoint by its own directory
    res = export_checkpoint(run / "checkpoints" / "step-00000001", tmp_path / "hf-1")
    assert_loads_with(tmp_path / "hf-1", weights[1], base_dir)
    assert res.dtype == "float32"


def test_weight_directory_dtype_and_cli(base_dir: Path, tmp_path: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    sd = {n: t + 0.01 for n, t in base.state_dict().items() if n != "lm_head.weight"}  # tied
    save_weights_dir(sd, tmp_path / "v000007", version=7)
    res = CliRunner().invoke(app, ["export", str(tmp_path / "v000007"), "--out", str(tmp_path / "hf"),
                                   "--model", str(base_dir), "--dtype", "bf16"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["kind"] == "weights_dir" and info["dtype"] == "bfloat16"
    assert info["params"] == sum(p.numel() for p in base.parameters())
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16).state_dict()
    for n, t in sd.items():
        assert torch.equal(got[n], t.to(torch.bfloat16)), n


def test_clear_errors(base_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        export_checkpoint(tmp_path / "nope", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="is not a checkpoint"):
        export_checkpoint(tmp_path / "empty", tmp_path / "o")
    save_weights_dir({"x": torch.zeros(2)}, tmp_path / "w", version=1)
    with pytest.raises(ExportError, match="pass --model"):
        export_checkpoint(tmp_path / "w", tmp_path / "o")
    with pytest.raises(ExportError, match="does not fit"):
        export_checkpoint(tmp_path / "w", tmp_path / "o", model=str(base_dir))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="--force"):
        export_checkpoint(tmp_path / "w", tmp_path / "full", model=str(base_dir))
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    res = CliRunner().invoke(app, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "does not exist" in res.output


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="no real vLLM: .venv-vllm is absent (bash scripts/setup-vllm.sh builds it)")
def test_real_vllm_serves_an_exported_checkpoint(base_dir: Path, tmp_path: Path) -> None:
    """vLLM loads the exported directory, and the log-probs it reports for its own greedy
    tokens are the exported weights' (recomputed with transformers), not the base model's."""
    import httpx

    train_run(base_dir, tmp_path / "trainer", 0)
    out = export_checkpoint(tmp_path / "trainer", tmp_path / "hf").out
    tok = AutoTokenizer.from_pretrained(out)
    prompt = render_prompt(tok, "Make 24 from 3 5 7 9.")
    with vllm_server(out, tmp_path, name="vllm-export") as srv:
        r = httpx.post(f"{srv.url}/v1/completions", timeout=300, json={
            "model": str(out.resolve()), "prompt": prompt, "max_tokens": 12, "temperature": 0,
            "logprobs": 1, "ignore_eos": True, "return_tokens_as_token_ids": True})
        r.raise_for_status()
    lp = r.json()["choices"][0]["logprobs"]
    ids = [int(t.removeprefix("token_id:")) for t in lp["tokens"]]
    served = torch.tensor(lp["token_logprobs"])
    assert len(ids) == 12

    def teacher_forced(model_dir: Path) -> torch.Tensor:
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        seq = torch.tensor([prompt + ids])
        with torch.no_grad():
            logp = torch.log_softmax(m(seq).logits[0, len(prompt) - 1:-1].float(), -1)
        return logp[torch.arange(len(ids)), torch.tensor(ids)]

    assert torch.allclose(served, teacher_forced(out), atol=2e-3), (served, teacher_forced(out))
    assert not torch.allclose(served, teacher_forced(base_dir), atol=2e-3)
