"""Measurements of a bootstrapped model: held-out accuracy (greedy and sampled) and the teacher
advantage (log-prob of a solution with vs without the privileged context).

Plain `transformers.generate` is enough here (a few hundred short prompts); the fast CPU
engine lives in services/ and is not imported (trainer and services stay separate)."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast, Qwen3ForCausalLM

from tasks.countdown import Problem, canonical_form, render_solution, solve_many, verify
from tasks.teacher import render_teacher_prompt
from trainer.bootstrap.chat import chat_prompt, encode_prompts, encode_responses


@torch.no_grad()
def generate(model: Qwen3ForCausalLM, tok: PreTrainedTokenizerFast, users: list[str], *,
             temperature: float, max_new_tokens: int = 48, seed: int = 0,
             batch_size: int = 256) -> list[str]:
    """One response per user message; temperature 0 = greedy. Pure temperature sampling
    (top_k=0, top_p=1), as in RL rollouts, not HF's default top-k 50."""
    torch.manual_seed(seed)
    out: list[str] = []
    for i in range(0, len(users), batch_size):
        enc = tok([chat_prompt(u) for u in users[i:i + batch_size]], return_tensors="pt",
                  padding=True, padding_side="left", add_special_tokens=False)
        kw = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} \
            if temperature > 0 else {"do_sample": False}
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, **kw)
        out.extend(tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def accuracy(model: Qwen3ForCausalLM, tok: PreTrainedTokenizerFast, problems: list[Problem], *,
             temperature: float, seed: int = 0) -> float:
    responses = generate(model, tok, [p.prompt_text() for p in problems], temperature=temperature,
                         seed=seed)
    return sum(verify(r, p.reference()).correct for r, p in zip(responses, problems, strict=True)) / len(problems)


@torch.no_grad()
def response_logprobs(model: Qwen3ForCausalLM, tok: PreTrainedTokenizerFast, users: list[str],
                      responses: list[str], batch_size: int = 128) -> list[float]:
    """Sum of log-probs of each response's tokens (EOS included) after chat(user)."""
    prompts, resps = encode_prompts(tok, users), encode_responses(tok, responses)
    out: list[float] = []
    for i in range(0, len(users), batch_size):
        pairs = list(zip(prompts[i:i + batch_size], resps[i:i + batch_size], strict=True))
        width = max(len(p) + len(r) for p, r in pairs)
        ids = torch.full((len(pairs), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, (p, r) in enumerate(pairs):
            ids[j, :len(p) + len(r)] = torch.tensor(p + r)
            mask[j, :len(p) + len(r)] = 1
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for j, (p, r) in enumerate(pairs):
            pos = torch.arange(len(p) - 1, len(p) + len(r) - 1)  # logits that predict r
            out.append(logp[j, pos, torch.tensor(r)].sum().item())
    return out


def teacher_advantage(model: Qwen3ForCausalLM, tok: PreTrainedTokenizerFast,
                      problems: list[Problem]) -> dict[str, float]:
    """Mean log-prob of each problem's reference solution: without context (the student),
    with the reference itself as demonstration, and (for problems that have one) with a
    *different* valid solution as demonstration, which is RLRT's sibling case."""
    prompts = [p.prompt_text() for p in problems]
    refs = [p.solution_text() for p in problems]
    student = response_logprobs(model, tok, prompts, refs)
    copy = response_logprobs(model, tok, [render_teacher_prompt(q, r) for q, r in zip(prompts, refs, strict=True)], refs)
    sib_idx, sib_users = [], []
    for i, (p, sols) in enumerate(zip(problems, solve_many(problems), strict=True)):
        ref_form = canonical_form(p.steps, p.numbers)
        others = [s for s in sols if canonical_form(s, p.numbers) != ref_form]
        if others:
            sib_idx.append(i)
            sib_users.append(render_teacher_prompt(prompts[i], render_solution(others[0], p.target)))
    sib = response_logprobs(model, tok, sib_users, [refs[i] for i in sib_idx]) if sib_idx else []

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    return {
        "logprob_student": mean(student),
        "logprob_teacher_copy": mean(copy),
        "logprob_student_on_sibling_problems": mean([student[i] for i in sib_idx]),
        "logprob_teacher_sibling": mean(sib),
        "sibling_problems": len(sib_idx),
    }
