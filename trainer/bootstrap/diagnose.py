"""Is the RLRT mechanism active for a model and task? Its diagnostics at step 0 of RL, in plain
torch: sample G responses per prompt, grade them, and on the correct responses of mixed groups
(the only ones RLRT re-weights) compute D_t = q_t - s_t (the paper's sign) with the sibling
teacher exactly as the pipeline does (tasks.teacher: another correct response of the group as
demonstration, the spec's template, the response's own tokens), then the RLRT weight w_t = exp(-D_t) (A > 0 on a
correct response) and where it sits against its clip bounds [1 - eps_w, 1 + eps_w].

    python -m trainer.bootstrap.diagnose MODEL_DIR [--prompts 64] [--group 8] [--knobs JSON]

Targets for an "active" regime (issue 15): mean |D| >= 0.3 nats on those tokens and >= 10% of
their weights at a clip bound. A seconds-long check before a multi-hour study.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasks import countdown
from tasks.teacher import pick_sibling, render_teacher_prompt
from trainer.bootstrap.chat import chat_prompt


@torch.no_grad()
def _sample(model, tok, users: list[str], G: int, max_new_tokens: int, temperature: float,
            seed: int) -> list[list[list[int]]]:
    """G responses (token ids, EOS included when emitted) per user message."""
    torch.manual_seed(seed)
    out: list[list[list[int]]] = []
    for u in users:
        enc = tok([chat_prompt(u)] * G, return_tensors="pt", add_special_tokens=False)
        ids = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                             max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[:, enc["input_ids"].shape[1]:]
        group = []
        for row in ids.tolist():
            if tok.eos_token_id in row:
                row = row[:row.index(tok.eos_token_id) + 1]
            group.append(row)
        out.append(group)
    return out


@torch.no_grad()
def _logprobs(model, tok, user: str, response: list[int]) -> torch.Tensor:
    prompt = tok(chat_prompt(user), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + response])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return logp[pos, torch.tensor(response)]


def diagnose(model_dir: str, *, prompts: int = 64, group_size: int = 8, eps_w: float = 1.0,
             temperature: float = 1.0, max_new_tokens: int = 64, seed: int = 0,
             knobs: dict | None = None, split: str = "heldout") -> dict[str, float]:
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    problems = countdown.dataset(split, prompts, seed + 1, **(knobs or {}))
    users = [p.prompt_text() for p in problems]
    groups = _sample(model, tok, users, group_size, max_new_tokens, temperature, seed)
    Ds: list[torch.Tensor] = []
    n_correct = n_mixed = n_all_right = 0
    lens: list[int] = []
    for k, (p, u, g) in enumerate(zip(problems, users, groups, strict=True)):
        texts = [tok.decode(r, skip_special_tokens=True) for r in g]
        ok = [countdown.verify(t, p.reference()).correct for t in texts]
        lens += [len(r) for r in g]
        n_correct += sum(ok)
        if all(ok):
            n_all_right += 1
        if not any(ok) or all(ok):
            continue
        n_mixed += 1
        for i, good in enumerate(ok):
            j = pick_sibling(ok, i, seed, str(k)) if good else None
            if j is None:  # wrong, or the only correct one (no sibling, no solution field)
                continue
            s = _logprobs(model, tok, u, g[i])
            q = _logprobs(model, tok, render_teacher_prompt(u, texts[j]), g[i])
            Ds.append(q - s)
    D = torch.cat(Ds) if Ds else torch.zeros(0)
    return {
        "prompts": len(problems),
        "accuracy": n_correct / (len(problems) * group_size),
        "mixed_groups": n_mixed / len(problems),
        "all_correct_groups": n_all_right / len(problems),
        "response_len_mean": sum(lens) / max(len(lens), 1),
        **weight_report(D, eps_w),
        "seconds": time.perf_counter() - t0,
    }


def weight_report(D: torch.Tensor, eps_w: float) -> dict[str, float]:
    """The RLRT weight of tokens of correct responses (A > 0: w = exp(-D), D = q - s) against
    its clip bounds, as the trainer's metrics (mean_abs_D_correct, clip_share) define them."""
    hi, lo = math.log1p(eps_w), (math.log(1 - eps_w) if eps_w < 1 else -math.inf)
    n = max(D.numel(), 1)
    x = -D  # log w
    return {
        "reweighted_tokens": int(D.numel()),
        "mean_D": float(D.sum() / n),
        "mean_abs_D": float(D.abs().sum() / n),
        "self_driven_share": float((D < 0).sum() / n),
        "clip_high_share": float((x >= hi).sum() / n),
        "clip_low_share": float((x <= lo).sum() / n),
        "clip_share": float(((x >= hi) | (x <= lo)).sum() / n),
        "mean_w": float(torch.exp(x).clamp(1 - eps_w, 1 + eps_w).sum() / n),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--eps-w", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--knobs", default="{}", help="Countdown generator knobs as JSON")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(json.dumps(diagnose(a.model_dir, prompts=a.prompts, group_size=a.group, eps_w=a.eps_w,
                              max_new_tokens=a.max_new_tokens, seed=a.seed,
                              knobs=json.loads(a.knobs)), indent=1))


if __name__ == "__main__":
    main()
