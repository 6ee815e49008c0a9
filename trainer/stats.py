"""Per-step statistics of the data itself (what the update metrics do not cover): rewards,
accuracy, lengths, staleness, teacher tokens, and what the driver dropped."""

from __future__ import annotations

from collections import Counter
from typing import Any

from protocol.messages import ScoredGroup
from trainer.batch import TrainBatch
from trainer.driver import Collected, task_index


def batch_stats(batch: TrainBatch, groups: list[ScoredGroup], version: int) -> dict[str, Any]:
    lens = batch.response_len.float()
    stale = batch.staleness.tolist()
    hist = Counter(stale)
    # s_t is computed with the weights that begin the step: its version is the step's.
    teacher_lag = [version - g.teacher_version for g in groups if g.teacher_version is not None]
    return {
        "samples": batch.size,
        "groups": len(groups),
        "reward_mean": float(batch.rewards.mean()),
        "reward_std": float(batch.rewards.std()) if batch.size > 1 else 0.0,
        "accuracy": float(batch.correct.float().mean()),
        "response_len_mean": float(lens.mean()),
        "response_len_max": float(lens.max()),
        "truncated_frac": float(batch.truncated.float().mean()),
        "staleness": sum(stale) / max(len(stale), 1),  # mean of s version - sampling version
        "staleness_max": max(stale) if stale else 0,
        "staleness_hist": {str(k): v for k, v in sorted(hist.items())},
        # s version - teacher version, over groups with teacher scores (0 under match_s)
        "teacher_version_lag": sum(teacher_lag) / len(teacher_lag) if teacher_lag else 0.0,
        "teacher_version_lag_max": max(teacher_lag) if teacher_lag else 0,
        "teacher_rows": int(batch.has_teacher.sum()),
        "teacher_tokens_scored": sum(g.scored_tokens for g in groups),
        "teacher_tokens_skipped": sum(g.skipped_tokens for g in groups),
        # the extra prefill of algorithm.student_logprobs: engine (prompt + response)
        "teacher_tokens_student": sum(g.student_context_tokens for g in groups),
    }


def collect_stats(coll: Collected) -> dict[str, Any]:
    out: dict[str, Any] = {f"dropped_{k}" if k in ("stale", "foreign") else k: v
                           for k, v in coll.counts.items()}
    out["time_wait_s"] = coll.wait_s
    return out


def trained_record(groups: list[ScoredGroup], version: int) -> dict[str, Any]:
    """Which prompts a step trained on, with each sample's versions (trained.jsonl)."""
    return {
        "version": version,
        "groups": [
            {"task_index": task_index(g), "prompt_id": g.task.prompt_id, "group_id": g.task.group_id,
             "engine_version": g.engine_version, "teacher_version": g.teacher_version,
             "s_version": version, "staleness": version - g.engine_version,
             "teacher_version_lag": (version - g.teacher_version
                                     if g.teacher_version is not None else None)}
            for g in groups
        ],
    }
