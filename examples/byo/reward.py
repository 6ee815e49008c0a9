"""A reward of your own, next to the built-in maths checker (examples/byo/config.yaml):

    reward:
      fns: [{fn: task}, {fn: "examples/byo/reward.py:boxed_once", weight: 0.1}]

`task` is math-verify on the final answer (1 or 0, and the `correct` flag RLRT's teacher gate
uses); this file adds a small format reward, so a response that boxes exactly one answer
scores 0.1 even when the answer is wrong. A reward function gets the response text, the
reference answer and the dataset row, and returns a float (or `(reward, correct)`, or
`{"reward": r, "correct": c}`). It runs inside the verifier's sandboxed pool with its
deadline; an exception dead-letters the group with the traceback (docs/byo.md).
"""

from __future__ import annotations

from typing import Any


def boxed_once(response: str, reference: str, row: dict[str, Any]) -> float:
    """1.0 when the response puts exactly one answer in \\boxed{...}, else 0.0."""
    return 1.0 if response.count("\\boxed{") == 1 else 0.0
