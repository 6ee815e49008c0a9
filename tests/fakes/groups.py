"""VerifiedGroups for teacher tests: a prompt rendered with the model's chat template and
responses tokenized from text, with verdicts given by the test."""

from __future__ import annotations

import numpy as np
from transformers import AutoTokenizer

from protocol.messages import PromptTask, Response, TeacherRequest, Verification, VerifiedGroup

QUESTION = "What is 2+3?"


def make_group(model_dir, texts: list[str], correct: list[bool], scope: str = "correct_mixed",  # noqa: ANN001
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
