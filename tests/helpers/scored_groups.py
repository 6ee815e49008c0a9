"""Hand-made ScoredGroups for trainer tests: chosen rewards, versions and teacher scores,
random token ids. (The driver tests that need *sampled* groups use tests/helpers/trainer_standin.py.)"""

from __future__ import annotations

import numpy as np

from protocol.messages import (
    PromptTask,
    Response,
    ScoredGroup,
    TeacherScores,
    Verification,
    derive_id,
)


def make_group(
    rewards: list[float],
    *,
    rng: np.random.Generator,
    vocab: int = 100,
    prompt_len: int = 6,
    resp_len: tuple[int, int] = (3, 9),
    engine_version: int = 0,
    teacher_rows: list[int] | None = None,
    task_index: int = 0,
    nonce: str = "n",
    run_id: str = "test",
) -> ScoredGroup:
    """One group with len(rewards) responses; teacher scores on `teacher_rows`."""
    task = PromptTask(
        run_id=run_id, msg_id=derive_id(run_id, f"task/{task_index}"), prompt_id=f"p{task_index}",
        group_id=derive_id(run_id, f"group/{task_index}"), prompt_text="q",
        prompt_ids=rng.integers(5, vocab, prompt_len).astype(np.int32), answer="a",
        group_size=len(rewards), policy_version=engine_version,
        meta={"task_index": task_index, "nonce": nonce},
    )
    responses, teacher = [], []
    for k in range(len(rewards)):
        n = int(rng.integers(resp_len[0], resp_len[1] + 1))
        responses.append(Response(
            token_ids=rng.integers(5, vocab, n).astype(np.int32),
            logprobs=(-rng.random(n) * 3).astype(np.float32),
            finish_reason="stop",
        ))
        if teacher_rows is not None and k in teacher_rows:
            teacher.append(TeacherScores(logprobs=(-rng.random(n) * 3).astype(np.float32),
                                         context_mode="sibling"))
        else:
            teacher.append(None)
    return ScoredGroup(
        run_id=run_id, msg_id=derive_id(task.msg_id, "scored"), task=task, responses=responses,
        engine_version=engine_version,
        verifications=[Verification(reward=r, correct=r == 1.0) for r in rewards],
        teacher=teacher, teacher_version=engine_version,
    )
