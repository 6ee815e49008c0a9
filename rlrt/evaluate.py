"""`rlrt eval`: avg@k and pass@k of the policy the rollout service is serving, through the
rollout service (sampling, via the bus with `reply_to`, so evaluation never enters training)
and the verifier's REST batch API (grading).

Paper defaults: k = 16, temperature 0.7, top-p 0.8.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from protocol.bus import Bus
from protocol.messages import PromptTask, RolloutGroup, SamplingParams


@dataclass(frozen=True)
class EvalItem:
    prompt_id: str
    prompt: str
    answer: str
    task: str = "math"


def load_items(source: str, *, n: int | None = None, seed: int = 0, task: str = "math",
               prompt_field: str = "prompt", answer_field: str = "answer",
               countdown_knobs: dict | None = None) -> list[EvalItem]:
    """`countdown` (held-out split of the built-in task) or a JSONL file of
    `{prompt, answer}` rows (AIME/MATH500 style)."""
    if source == "countdown":
        from protocol.tasks import countdown

        probs = countdown.dataset("heldout", n or 200, seed, **(countdown_knobs or {}))
        return [EvalItem(f"countdown:{p.key()}", p.prompt_text(), p.reference(), "countdown")
                for p in probs]
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation data not found: {path}")
    items = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        if prompt_field not in row or answer_field not in row:
            raise ValueError(f"{path}:{i + 1}: row lacks '{prompt_field}' or '{answer_field}'")
        items.append(EvalItem(str(row.get("id", i)), str(row[prompt_field]),
                              str(row[answer_field]), str(row.get("task", task))))
    return items[:n] if n else items


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def render_prompt(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                        add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


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


async def evaluate(items: list[EvalItem], *, tokenizer: Any, bus: Bus, prompts_stream: str,
                   verifier_url: str, token: str | None = None, k: int = 16,
                   sampling: SamplingParams | None = None, run_id: str = "eval",
                   timeout_s: float = 1800.0, seed: int = 0) -> dict[str, Any]:
    """Sample k responses per item through the rollout service and grade them."""
    sampling = sampling or SamplingParams(temperature=0.7, top_p=0.8, max_new_tokens=1024)
    reply = bus.cfg.stream(f"eval:{uuid.uuid4().hex[:12]}")
    by_group: dict[str, EvalItem] = {}
    t0 = time.perf_counter()
    for i, it in enumerate(items):
        task = PromptTask(run_id=run_id, prompt_id=it.prompt_id, prompt_text=it.prompt,
                          prompt_ids=render_prompt(tokenizer, it.prompt), answer=it.answer,
                          task=it.task, group_size=k,
                          sampling=sampling.model_copy(update={"seed": seed * 100_003 + i}),
                          reply_to=reply)
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
            {"response": r.text, "reference": by_group[gid].answer, "task": by_group[gid].task}
            for gid, r in flat])
    correct: dict[str, list[bool]] = {gid: [] for gid in groups}
    lengths = []
    for (gid, r), res in zip(flat, results, strict=True):
        correct[gid].append(bool(res["correct"]))
        lengths.append(len(r.token_ids))
    per_item = [{"prompt_id": by_group[gid].prompt_id, "correct": sum(c), "n": len(c)}
                for gid, c in correct.items()]
    avg = sum(p["correct"] / p["n"] for p in per_item) / len(per_item)
    ks = sorted({1, k} | {x for x in (2, 4, 8) if x < k})
    return {
        "n_prompts": len(per_item), "k": k, "temperature": sampling.temperature,
        "top_p": sampling.top_p, f"avg@{k}": avg,
        **{f"pass@{x}": sum(pass_at_k(p["n"], p["correct"], x) for p in per_item) / len(per_item)
           for x in ks},
        "mean_response_tokens": sum(lengths) / max(1, len(lengths)),
        "engine_version": max(g.engine_version for g in groups.values()),
        "seconds": time.perf_counter() - t0, "sample_seconds": sample_s,
    }
