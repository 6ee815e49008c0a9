"""`rlrt inspect`: which tokens of a correct rollout does RLRT treat as self-driven?

For a handful of prompts this samples G responses each, grades them, and for every correct
response of a mixed group computes, per token,

    s_t = log pi(y_t | x, y_<t)        the student (what the trainer recomputes)
    q_t = log pi(y_t | c, x, y_<t)     the teacher, with the privileged context c
    D_t = q_t - s_t,  w_t,  A_kt       (the paper's sign) through the trainer's own `token_advantages`

then writes inspect.html / inspect.png / inspect.json (rendering in rlrt/inspect_render.py).

Every step goes through the code the running system uses, so what is shown is what training
would do: the data loading and the one prompt rendering of tasks, the verifier's
`check` dispatch, the teacher service's `build_contexts` (sibling demonstration, reference-solution fallback), the
trainer's chunked `token_logprobs` and `token_advantages`. Only sampling differs: plain HF
`generate` stands in for the rollout engine (same model, same EOS set, full-vocabulary
sampling), because s_t is recomputed by the trainer from the tokens anyway.

Temperatures follow the system too: s_t divides the logits by the sampling temperature (the
trainer's default `logprob_temperature`), q_t is the teacher engine's raw log-prob (T = 1).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protocol.messages import (
    PromptTask,
    Response,
    SamplingParams,
    TeacherRequest,
    Verification,
    VerifiedGroup,
)
from tasks.base import render_row
from tasks.data import DataConfig, load_rows, spec_from_cli
from tasks.hub import looks_like_hub_id
from trainer.algorithm import AlgorithmConfig, token_advantages, token_logprobs

log = logging.getLogger("rlrt.inspect")


@dataclass
class TokenInfo:
    id: int
    text: str
    s: float  # student log-prob
    q: float  # teacher log-prob
    d: float  # D = q - s, the paper's sign
    w: float  # clipped weight w_t the trainer applies (1 where the row is not re-weighted)
    adv: float  # A_kt


@dataclass
class Shown:
    """One correct, teacher-scored response, with everything the page shows about it."""

    prompt_index: int
    response_index: int
    prompt: str
    answer: str
    text: str
    reward: float
    group_rewards: list[float]
    adv: float  # A_k
    finish_reason: str
    demo_mode: str
    demo_index: int | None
    demo_text: str
    teacher_context_ids: list[int]  # what the teacher scored: context + response tokens
    response_start: int
    tokens: list[TokenInfo] = field(default_factory=list)


@dataclass
class Report:
    preset: str
    eps_w: float
    lam: float
    temperature: float
    shown: list[Shown]
    summary: dict[str, Any]
    # Every sampled response in brief (text, reward, scored or not): when nothing is shown,
    # this says why (all wrong, no final answer, cut at the length cap, ...).
    responses: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------- data


def inspect_data(data: str | DataConfig) -> DataConfig:
    """`countdown` (the built-in task's training split: its rows carry reference solutions, so
    the solution fallback is exercised), a data file, or a data section."""
    if isinstance(data, DataConfig):
        return data
    spec = spec_from_cli(data)
    if "hf_dataset" in spec and not looks_like_hub_id(data):
        raise FileNotFoundError(f"data not found: {data} (use 'countdown' or a JSONL file)")
    return DataConfig.model_validate(spec)


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a response, as the CPU engine collects them (generation config,
    model config, tokenizer)."""
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        if eos is not None:
            ids.update([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    return sorted(ids)


# --------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample_group(model: Any, tokenizer: Any, prompt_ids: list[int], g: int, *, temperature: float,
                 max_new_tokens: int, seed: int, stop: list[int]) -> list[Response]:
    """G responses to one prompt. Each ends at its first EOS, which it keeps (as the engines
    report it); the sampling log-prob comes from generate's processed scores."""
    torch.manual_seed(seed)
    ids = torch.tensor([prompt_ids] * g, dtype=torch.long)
    greedy = temperature <= 0
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
        do_sample=not greedy, temperature=None if greedy else temperature,
        # top_k=0 / top_p=1: the full distribution, like the rollout engine (HF's default
        # generation config would otherwise apply top-k 50).
        top_k=0, top_p=1.0, eos_token_id=stop,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0],
        output_scores=True, return_dict_in_generate=True)
    new = out.sequences[:, len(prompt_ids):]
    lps = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)  # [g, T, V]
    responses = []
    for k in range(g):
        toks = new[k].tolist()
        end = next((i + 1 for i, t in enumerate(toks) if t in stop), None)
        toks = toks[:end] if end is not None else toks[:max_new_tokens]
        lp = lps[k, torch.arange(len(toks)), torch.tensor(toks, dtype=torch.long)]
        responses.append(Response(
            token_ids=np.asarray(toks, np.int32), logprobs=lp.numpy().astype(np.float32),
            finish_reason="stop" if end is not None else "length",
            text=tokenizer.decode(toks, skip_special_tokens=True)))
    return responses


def grade(task: str, text: str, answer: str) -> Verification:
    """The verifier's own dispatch (math-verify or the synthetic task's checker), in process:
    fine for one's own samples, where the service's sandbox guards against hostile text."""
    from services.verifier.core import check

    try:
        r = check(task, text, answer)
    except Exception as e:  # noqa: BLE001 -- a crashing check is a wrong answer, as in the service
        return Verification(reward=0.0, correct=False, status="error", detail=str(e)[:200])
    return Verification(reward=r.reward, correct=r.correct, status=r.status, detail=r.detail)


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def _logprobs_at(model: Any, ids: list[int], start: int, temperature: float) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= start, via the trainer's token_logprobs."""
    x = torch.tensor([ids], dtype=torch.long)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[0, start:] = True
    return token_logprobs(model, x, logprob_mask=mask, temperature=temperature).logprobs[0, start:]


def token_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """The text each token adds, decoding growing prefixes so multi-byte characters split
    over tokens come out whole (decoding tokens one by one would show replacement chars)."""
    pieces, prev = [], ""
    for i in range(len(ids)):
        cur = tokenizer.decode(ids[: i + 1], skip_special_tokens=False)
        if cur.startswith(prev):
            pieces.append(cur[len(prev):])
        else:  # the decoder rewrote earlier text (a completed character): show this token alone
            pieces.append(tokenizer.decode([ids[i]], skip_special_tokens=False))
        prev = cur
    return pieces


def inspect_rollouts(model_dir: str | Path, *, data: str | DataConfig = "countdown", n: int = 8, g: int = 8,
                     preset: str = "rlrt", eps_w: float | None = None, lam: float | None = None,
                     seed: int = 0, temperature: float = 1.0, max_new_tokens: int = 64,
                     log_fn: Callable[[str], None] = log.info) -> Report:
    """Sample, grade, score and weight; returns the correct teacher-scored responses."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.teacher.worker import build_contexts

    overrides = {k: v for k, v in (("eps_w", eps_w), ("lam", lam)) if v is not None}
    cfg = AlgorithmConfig.from_preset(preset, **overrides)
    if not cfg.uses_teacher:
        raise ValueError(f"preset {preset!r} uses no teacher: there is no D_t to show")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    stop = eos_ids(model, tokenizer)
    data_cfg = inspect_data(data)
    items = load_rows(data_cfg, seed=seed, n=n)
    request: TeacherRequest = cfg.teacher_request(
        system_prompt=data_cfg.system_prompt, chat_template_kwargs=data_cfg.chat_template_kwargs
    ).model_copy(update={"chat_template": data_cfg.chat_template})
    s_temp = temperature if temperature > 0 else 1.0

    groups: list[VerifiedGroup] = []
    for i, it in enumerate(items):
        prompt_ids = render_row(tokenizer, it, system_prompt=data_cfg.system_prompt,
                                chat_template_kwargs=data_cfg.chat_template_kwargs,
                                chat_template=data_cfg.chat_template)
        responses = sample_group(model, tokenizer, prompt_ids, g, temperature=temperature,
                                 max_new_tokens=max_new_tokens, seed=seed * 100_003 + i, stop=stop)
        task = PromptTask(
            run_id="inspect", prompt_id=it.prompt_id, group_id=f"inspect:{seed}:{i}",
            prompt_text=it.prompt, prompt_ids=np.asarray(prompt_ids, np.int32), answer=it.answer,
            prompt_history=[dict(m) for m in it.messages[:-1]] if it.messages else None,
            solution=it.solution, task=it.task, group_size=g, teacher=request,
            sampling=SamplingParams(temperature=max(temperature, 0.0),
                                    max_new_tokens=max_new_tokens))
        groups.append(VerifiedGroup(
            run_id="inspect", task=task, responses=responses, engine_version=0,
            verifications=[grade(it.task, r.text, it.answer) for r in responses]))
        log_fn(f"prompt {i + 1}/{len(items)}: {sum(groups[-1].rewards):.0f}/{g} correct")

    # Student and teacher log-probs of every response the teacher service would score. The
    # other rows only need their length (the mask): their A_kt is A_k whatever s_t is, so the
    # forwards, the slow part on a real model, are spent on scored rows alone.
    rows: list[tuple[int, int]] = []  # (group, response) in batch order
    s_list: list[torch.Tensor | None] = []
    q_list: list[torch.Tensor | None] = []
    ctx_of: dict[int, Any] = {}
    for gi, grp in enumerate(groups):
        ctxs = build_contexts(grp, tokenizer)
        p = grp.task.prompt_ids.tolist()
        for k, r in enumerate(grp.responses):
            resp = r.token_ids.tolist()
            rows.append((gi, k))
            ctx = ctxs[k]
            if ctx is None or not resp:
                s_list.append(None)
                q_list.append(None)
                continue
            s_list.append(_logprobs_at(model, p + resp, len(p), s_temp))
            q_list.append(_logprobs_at(model, ctx.input_ids, ctx.response_start, 1.0))
            ctx_of[len(rows) - 1] = ctx
        log_fn(f"scored prompt {gi + 1}/{len(groups)}")

    lengths = [len(groups[gi].responses[k].token_ids) for gi, k in rows]
    B, T = len(rows), max(1, *lengths)
    s_t, q_t = torch.zeros(B, T), torch.zeros(B, T)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (s, q) in enumerate(zip(s_list, q_list, strict=True)):
        mask[b, : lengths[b]] = True
        if s is not None and q is not None:
            s_t[b, : len(s)] = s
            q_t[b, : len(q)] = q
    has_teacher = torch.tensor([q is not None for q in q_list])
    rewards = torch.tensor([groups[gi].rewards[k] for gi, k in rows], dtype=torch.float32)
    correct = torch.tensor([groups[gi].verifications[k].correct for gi, k in rows])
    adv = token_advantages(cfg, rewards=rewards, group_ids=torch.tensor([gi for gi, _ in rows]),
                           mask=mask, student_logprobs=s_t, teacher_logprobs=q_t,
                           has_teacher=has_teacher, correct=correct, step=0)

    shown: list[Shown] = []
    for b, (gi, k) in enumerate(rows):
        if not (correct[b] and has_teacher[b]):
            continue  # only correct rollouts the teacher scored have a D_t to show
        grp, ctx = groups[gi], ctx_of[b]
        resp = grp.responses[k]
        ids = resp.token_ids.tolist()
        pieces = token_pieces(tokenizer, ids)
        toks = [TokenInfo(id=ids[t], text=pieces[t], s=float(s_t[b, t]), q=float(q_t[b, t]),
                          d=float(q_t[b, t] - s_t[b, t]), w=float(adv.weights[b, t]),
                          adv=float(adv.advantages[b, t])) for t in range(len(ids))]
        shown.append(Shown(
            prompt_index=gi, response_index=k, prompt=grp.task.prompt_text, answer=grp.task.answer,
            text=resp.text, reward=grp.rewards[k], group_rewards=list(grp.rewards),
            adv=float(adv.group.advantages[b]), finish_reason=resp.finish_reason,
            demo_mode=ctx.demonstration.mode, demo_index=ctx.demonstration.index,
            demo_text=ctx.demonstration.text, teacher_context_ids=list(ctx.input_ids),
            response_start=ctx.response_start, tokens=toks))

    all_rewards = [grp.rewards for grp in groups]
    summary = {
        "model": str(model_dir), "data": data, "prompts": len(groups), "group_size": g,
        "seed": seed, "max_new_tokens": max_new_tokens,
        "responses": B, "correct": int(correct.sum()),
        "mixed_groups": sum(0 < sum(r) < len(r) for r in all_rewards),
        "all_correct_groups": sum(min(r) == max(r) == 1 for r in all_rewards),
        "all_wrong_groups": sum(max(r) == 0 for r in all_rewards),
        "teacher_scored": int(has_teacher.sum()),
        "shown": len(shown),
        "self_driven_share": adv.metrics["self_driven_share"],
        "mean_D_correct": adv.metrics["mean_D_correct"],
        "weight_mean": adv.metrics["weight_mean"],
    }
    brief = [{"prompt_index": gi, "response_index": k, "reward": groups[gi].rewards[k],
              "status": groups[gi].verifications[k].status,
              "finish_reason": groups[gi].responses[k].finish_reason,
              "teacher_scored": bool(has_teacher[b]), "text": groups[gi].responses[k].text}
             for b, (gi, k) in enumerate(rows)]
    return Report(preset=preset, eps_w=cfg.eps_w, lam=cfg.lam_at(0), temperature=temperature,
                  shown=shown, summary=summary, responses=brief)


def write_outputs(report: Report, out_dir: str | Path) -> dict[str, Path]:
    """inspect.html, inspect.png and inspect.json (the numbers behind both) in `out_dir`."""
    from rlrt.inspect_render import render_html, render_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"html": out / "inspect.html", "png": out / "inspect.png", "json": out / "inspect.json"}
    paths["html"].write_text(render_html(report), encoding="utf-8")
    render_png(report, paths["png"])
    paths["json"].write_text(json.dumps(asdict(report), indent=1), encoding="utf-8")
    return paths
