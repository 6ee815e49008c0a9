"""`rlrt eval`: avg@k and pass@k of the policy the rollout service is serving, through the
rollout service (sampling, via the bus with `reply_to`, so evaluation never enters training)
and the verifier's REST batch API (grading).

Paper defaults: k = 16, temperature 0.7, top-p 0.8.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Mapping
from typing import Any

import httpx

from protocol.bus import Bus
from protocol.messages import PromptTask, RolloutGroup, SamplingParams
from tasks.base import Row, render_row
from tasks.rewards import prompt_row


class EvalError(RuntimeError):
    """Responses could not be graded (a reward function raised, the verifier failed them):
    an evaluation with errors is reported as such, never as a score of 0."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


async def grade(client: httpx.AsyncClient, verifier_url: str, token: str | None,
                items: list[dict]) -> list[dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    out: list[dict] = []
    for i in range(0, len(items), 512):
        for _attempt in range(30):
            r = await client.post(f"{verifier_url}/v1/verify/batch", json={"items": items[i:i + 512]},
                                  headers=headers)
            if r.status_code != 429:
                break
            await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
        r.raise_for_status()
        out.extend(r.json()["results"])
    return out


async def evaluate(items: list[Row], *, tokenizer: Any, bus: Bus, prompts_stream: str,
                   verifier_url: str, token: str | None = None, k: int = 16,
                   sampling: SamplingParams | None = None, run_id: str = "eval",
                   timeout_s: float = 1800.0, seed: int = 0, system_prompt: str | None = None,
                   chat_template_kwargs: Mapping[str, Any] | None = None,
                   chat_template: str | None = None, reward: bool = False) -> dict[str, Any]:
    """Sample k responses per row through the rollout service and grade them. Rows are
    rendered exactly as training renders them (the data section's system prompt and
    chat-template arguments and choice). `reward`: grade with the verifier's reward plug-ins
    (the run's `reward:` section), so `correct` is the same gate as in training. Raises
    EvalError when any response could not be graded (status 'error')."""
    sampling = sampling or SamplingParams(temperature=0.7, top_p=0.8, max_new_tokens=1024)
    reply = bus.cfg.stream(f"eval:{uuid.uuid4().hex[:12]}")
    by_group: dict[str, Row] = {}
    t0 = time.perf_counter()
    for i, it in enumerate(items):
        task = PromptTask(run_id=run_id, prompt_id=it.prompt_id, prompt_text=it.prompt,
                          prompt_ids=render_row(tokenizer, it, system_prompt=system_prompt,
                                                chat_template_kwargs=chat_template_kwargs,
                                                chat_template=chat_template),
                          prompt_history=[dict(m) for m in it.messages[:-1]] if it.messages
                          else None,
                          answer=it.answer, solution=it.solution,
                          task=it.task, group_size=k,
                          sampling=sampling.model_copy(update={"seed": seed * 100_003 + i}),
                          reply_to=reply, meta={"fields": dict(it.fields)} if it.fields else {})
        by_group[task.group_id] = it
        await bus.publish(prompts_stream, task)

    groups: dict[str, RolloutGroup] = {}
    stop = asyncio.Event()

    async def collect(g: RolloutGroup) -> None:
        groups[g.task.group_id] = g
        if len(groups) == len(by_group):
            stop.set()

    try:
        await asyncio.wait_for(bus.consume(reply, "eval", "eval", collect, RolloutGroup, stop,
                                           concurrency=8), timeout_s)
    except asyncio.TimeoutError:
        raise TimeoutError(f"evaluation got {len(groups)}/{len(by_group)} groups from the rollout "
                           f"service within {timeout_s:.0f}s") from None
    finally:
        await bus.r.delete(reply)
    sample_s = time.perf_counter() - t0

    flat = [(gid, r) for gid, g in groups.items() for r in g.responses]
    async with httpx.AsyncClient(timeout=300) as client:
        results = await grade(client, verifier_url, token, [
            # The row always travels: its data_source picks the math extraction policy
            # (verifier.math_policy_by_source) for evaluation exactly as for training.
            {"response": r.text, "reference": by_group[gid].answer, "task": by_group[gid].task,
             "row": prompt_row(groups[gid].task), **({"reward": True} if reward else {})}
            for gid, r in flat])
    errors = [res for res in results if res.get("status") == "error"]
    if errors:
        raise EvalError(f"{len(errors)} of {len(results)} responses could not be graded; the "
                        f"first: {errors[0].get('detail') or 'no detail'} (the verifier's log "
                        "has the traceback)")
    correct: dict[str, list[bool]] = {gid: [] for gid in groups}
    lengths, scores = [], []
    for (gid, r), res in zip(flat, results, strict=True):
        correct[gid].append(bool(res["correct"]))
        lengths.append(len(r.token_ids))
        scores.append(float(res["reward"]))
    per_item = [{"prompt_id": by_group[gid].prompt_id, "correct": sum(c), "n": len(c)}
                for gid, c in correct.items()]
    avg = sum(p["correct"] / p["n"] for p in per_item) / len(per_item)
    ks = range(1, k + 1)  # pass@1..k: the paper reads the whole curve
    return {
        "n_prompts": len(per_item), "k": k, "temperature": sampling.temperature,
        "top_p": sampling.top_p, f"avg@{k}": avg,
        **{f"pass@{x}": sum(pass_at_k(p["n"], p["correct"], x) for p in per_item) / len(per_item)
           for x in ks},
        "reward_mean": sum(scores) / max(1, len(scores)),
        "mean_response_tokens": sum(lengths) / max(1, len(lengths)),
        "engine_version": max(g.engine_version for g in groups.values()),
        "seconds": time.perf_counter() - t0, "sample_seconds": sample_s,
    }
