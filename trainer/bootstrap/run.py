"""`bootstrap`: build the tokenizer and a tiny Qwen3, SFT it on Countdown, measure it, and save
everything in HF layout (what `rlrt bootstrap` calls):

    out_dir/ config.json generation_config.json model.safetensors tokenizer.json
             tokenizer_config.json chat_template.jinja bootstrap.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from tasks import countdown
from trainer.bootstrap.evaluate import accuracy, teacher_advantage
from trainer.bootstrap.model import build_model, num_params
from trainer.bootstrap.sft import SFTConfig, prepare, train_sft
from trainer.bootstrap.tokenizer import build_tokenizer


def bootstrap(out_dir: str | Path, *, seed: int = 0, steps: int = 900, batch_size: int = 32,
              lr: float = 3e-3, hidden: int = 64, layers: int = 4, heads: int = 2,
              kv_heads: int = 1, train_problems: int = 8000, eval_problems: int = 200,
              time_limit_s: float | None = None, task_knobs: dict | None = None,
              threads: int | None = 1, sft: dict | None = None, log=print) -> dict:
    """Train and save a bootstrapped model; returns (and writes to bootstrap.json) its metrics.
    Deterministic under `seed` unless `time_limit_s` stops SFT early. `task_knobs` override the
    Countdown generator's defaults (which RL uses too, unless its config says otherwise)."""
    # One thread by default: with hidden 64 the ops are tiny, and on a shared 2-core machine
    # two OpenMP threads spin-wait on each other (measured here: 6x slower than one thread
    # under load). Fixed thread count also keeps the float reductions, so the run, identical.
    # Restored afterwards: the caller (e.g. `rlrt train`) may go on to train with its own.
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _bootstrap(
            Path(out_dir), seed=seed, steps=steps, batch_size=batch_size, lr=lr, hidden=hidden,
            layers=layers, heads=heads, kv_heads=kv_heads, train_problems=train_problems,
            eval_problems=eval_problems, time_limit_s=time_limit_s, knobs=dict(task_knobs or {}),
            sft=sft or {}, log=log,
        )
    finally:
        torch.set_num_threads(before)


def _bootstrap(out: Path, *, seed: int, steps: int, batch_size: int, lr: float, hidden: int,
               layers: int, heads: int, kv_heads: int, train_problems: int, eval_problems: int,
               time_limit_s: float | None, knobs: dict, sft: dict, log) -> dict:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)

    tok = build_tokenizer()
    model = build_model(tok, seed=seed, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads)
    train = countdown.dataset("train", train_problems, seed, **knobs)
    heldout = countdown.dataset("heldout", eval_problems, seed + 1, **knobs)
    items = prepare(tok, train)
    t_data = time.perf_counter() - t0
    log(f"bootstrap: {num_params(model)} params, {len(items)} train problems, data {t_data:.1f}s")

    cfg = SFTConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, time_limit_s=time_limit_s,
                    **sft)  # sft: other SFTConfig fields (teacher_fraction, ...)
    result = train_sft(model, tok, items, cfg, log=log)

    t1 = time.perf_counter()
    metrics = {
        "seed": seed,
        "params": num_params(model),
        "model": {"hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads},
        "task": {"name": "countdown", "knobs": knobs},
        "train_problems": len(train),
        "eval_problems": len(heldout),
        "solution_diversity_heldout": countdown.solution_diversity(heldout),
        "sft": {**result, **{k: v for k, v in cfg.__dict__.items() if k != "log_every"}},
        "heldout_accuracy_greedy": accuracy(model, tok, heldout, temperature=0.0),
        "heldout_accuracy_sampled": accuracy(model, tok, heldout, temperature=1.0, seed=seed),
        "teacher": teacher_advantage(model, tok, heldout),
    }
    metrics["eval_seconds"] = time.perf_counter() - t1
    metrics["total_seconds"] = time.perf_counter() - t0

    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "bootstrap.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"bootstrap: greedy {metrics['heldout_accuracy_greedy']:.3f} sampled "
        f"{metrics['heldout_accuracy_sampled']:.3f} in {metrics['total_seconds']:.0f}s -> {out}")
    return metrics
