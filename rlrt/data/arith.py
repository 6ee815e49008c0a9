"""One-step arithmetic word problems with `\\boxed{}` answers, for smoke runs of the full
system on a small real chat model.

SmolLM2-135M-Instruct is weak: asked plainly, at temperature 1 it almost never ends with a
gradable answer (it writes "9 + 8 = 17" and stops, or boxes the word "N"). So numbers are
single digits and each prompt carries one worked example in the answer format (measured here:
about 1 in 8 samples correct at temperature 1, so a few groups per step are mixed and RLRT
has correct rollouts to re-weight). `example=False` gives the bare question.

Rows are what `trainer.data` reads with `data: {source: jsonl, task: math}`:
    {"id": ..., "prompt": ..., "answer": "8", "solution": "3 + 5 = 8, so the answer is \\boxed{8}."}
graded by math-verify against `answer`. Deterministic in `seed`.

    python -m rlrt.data.arith --n 64 --out runs/data/arith.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ("Tom", "Anna", "Li", "Sara", "Omar", "Maya", "Ben", "Zoe")
THINGS = ("apples", "books", "coins", "pencils", "stickers", "marbles", "cookies", "stamps")
INSTRUCTION = "Put the final answer in \\boxed{}."
EXAMPLE = ("Question: Anna has 3 pens and gets 4 more. How many pens does Anna have now?\n"
           "Answer: 3 + 4 = 7, so the answer is \\boxed{7}.")


def problem(rng: random.Random, *, example: bool = True) -> dict[str, str]:
    """One problem: addition, subtraction or multiplication of single-digit numbers."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    kind = rng.choice(("add", "sub", "mul"))
    if kind == "add":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        text = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"
        expr, ans = f"{a} + {b}", a + b
    elif kind == "sub":
        a = rng.randint(5, 9)
        b = rng.randint(1, a - 1)
        text = f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?"
        expr, ans = f"{a} - {b}", a - b
    else:
        a, b = rng.randint(2, 5), rng.randint(2, 5)
        text = f"{name} has {a} boxes with {b} {thing} in each. How many {thing} are there in total?"
        expr, ans = f"{a} \\times {b}", a * b
    prompt = (f"Example:\n{EXAMPLE}\n\nQuestion: {text}\nAnswer:" if example
              else f"{text} {INSTRUCTION}")
    return {"prompt": prompt, "answer": str(ans),
            "solution": f"{expr} = {ans}, so the answer is \\boxed{{{ans}}}."}


def generate(n: int, seed: int = 0, *, example: bool = True) -> list[dict[str, str]]:
    rng = random.Random(f"arith:{seed}")
    return [{"id": f"arith:{seed}:{i}", **problem(rng, example=example)} for i in range(n)]


def write_jsonl(path: str | Path, n: int, seed: int = 0, *, example: bool = True) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in generate(n, seed, example=example)))
    return out


def main() -> None:  # pragma: no cover - thin CLI
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-example", action="store_true", help="bare questions, no worked example")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    print(write_jsonl(args.out, args.n, args.seed, example=not args.no_example))


if __name__ == "__main__":  # pragma: no cover
    main()
