"""The service half of the weight canary (protocol/canary.py): check a canary's shape before
loading, judge the served log-probs after loading, count and log the verdict.

Every engine calls these from its own update path: the CPU engine on its worker thread right
after the swap (and swaps back on a mismatch), the remote engines inside their update
transaction (a mismatch rolls back to the last good directory, or quarantines).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

from prometheus_client import Counter, Gauge

from protocol.canary import Canary, CanaryResult, compare, tolerance_for
from services.engines.base import WeightUpdateError

log = logging.getLogger("rlrt.engines.canary")

CHECKS = Counter("rlrt_engine_canary_checks_total", "weight canaries checked after a load",
                 ["engine", "result"])
MAX_DIFF = Gauge("rlrt_engine_canary_max_diff",
                 "max |served - trainer| log-prob of the last weight canary", ["engine"])


class CanaryMismatch(WeightUpdateError):
    """The loaded weights do not reproduce the trainer's log-probs: not the pushed weights."""

    def __init__(self, result: CanaryResult, version: int) -> None:
        super().__init__(f"refused version {version}: {result.describe()}; the served weights "
                         "are not the pushed ones")
        self.canary_result = result


def check_canary_shape(canary: Canary, vocab_size: int | None, context_len: int | None) -> None:
    """Refuse, before anything is loaded, a canary this engine cannot score."""
    for i, s in enumerate(canary.sequences):
        bad = [t for t in s if t < 0 or (vocab_size is not None and t >= vocab_size)]
        if bad:
            raise WeightUpdateError(f"refused: canary sequence {i} has token id {bad[0]} outside "
                                    f"the vocabulary [0, {vocab_size})")
        if context_len is not None and len(s) >= context_len:
            raise WeightUpdateError(f"refused: canary sequence {i} has {len(s)} tokens; the "
                                    f"context window is {context_len}")


def judge_canary(kind: str, canary: Canary, served: Sequence[Sequence[float]], version: int,
                 table: Mapping[str, float], serving_dtype: str | None = None) -> CanaryResult:
    """Compare, record the metric and a log line; raise CanaryMismatch when over tolerance.
    The tolerance is that of the coarser of the pushed weights' and the server's dtype."""
    try:
        tol = tolerance_for([canary.dtype, serving_dtype], table)
        result = compare(canary, served, tol)
    except ValueError as e:
        CHECKS.labels(kind, "error").inc()
        raise WeightUpdateError(f"refused version {version}: weight canary: {e}") from None
    MAX_DIFF.labels(kind).set(result.max_diff)
    CHECKS.labels(kind, "ok" if result.ok else "mismatch").inc()
    if not result.ok:
        log.error("%s v%d: %s", kind, version, result.describe())
        raise CanaryMismatch(result, version)
    log.info("%s v%d: %s", kind, version, result.describe())
    return result


def canary_fields(err: BaseException) -> dict[str, dict]:
    """`{"canary": {...}}` for the 409 body when `err` is (or carries) a canary verdict."""
    result = getattr(err, "canary_result", None)
    if not isinstance(result, CanaryResult):
        return {}
    finite = math.isfinite(result.max_diff)  # JSON has no inf: null = a non-finite mismatch
    return {"canary": {"max_diff": result.max_diff if finite else None,
                       "tolerance": result.tolerance,
                       "sequence": result.sequence, "position": result.position}}
