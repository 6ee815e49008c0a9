"""Hand-made groups for tests. `scored_group`: a ScoredGroup for trainer tests (chosen rewards,
versions and teacher scores, random token ids; the driver tests that need *sampled* groups use
tests/support/trainer_standin.py). `verified_group`: a VerifiedGroup for teacher tests (a prompt
rendered with the model's chat template, responses tokenized from text, verdicts given by the
test)."""

from __future__ import annotations

import numpy as np
from transformers import AutoTokenizer

from protocol.messages import (
    PromptTask,
    Response,
    ScoredGroup,
    TeacherRequest,
    TeacherScores,
    Verification,
    VerifiedGroup,
    derive_id,
)


def scored_group(
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


QUESTION = "What is 2+3?"


def verified_group(model_dir, texts: list[str], correct: list[bool], scope: str = "correct_mixed",  # noqa: ANN001
                   group_id: str = "g1", **teacher: str) -> VerifiedGroup:
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=True,
                                     add_generation_prompt=True, return_dict=False)
    task = PromptTask(run_id="r", prompt_id="p", group_id=group_id, prompt_text=QUESTION,
                      prompt_ids=np.asarray(prompt), answer="5", solution="2+3=5",
                      group_size=len(texts),
                      teacher=TeacherRequest(scope=scope, **teacher))  # type: ignore[arg-type]
    responses = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        responses.append(Response(token_ids=np.asarray(ids), logprobs=np.zeros(len(ids)),
                                  finish_reason="stop", text=t))
    return VerifiedGroup(run_id="r", task=task, responses=responses, engine_version=0,
                         verifications=[Verification(reward=float(c), correct=c) for c in correct])
