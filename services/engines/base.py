"""The one engine interface the rollout and teacher services talk to.

Three implementations: the built-in CPU engine (`services.engines.cpu.CpuEngine`, embedded in
the service process) and HTTP clients for SGLang (rollout) and vLLM (teacher). All methods are
async because the services are asyncio and two of the three engines are remote servers.

Log-prob semantics every engine must document:
- `generate()` returns, per response token, the log-prob of the sampled token. "processed" =
  under the distribution actually sampled from (after temperature / top-k / top-p), which is
  the behaviour policy mu for the importance-weight correction; "raw" = log_softmax of the
  unmodified logits (temperature 1, no filtering), vLLM's `raw_logprobs`.
- `score()` always returns raw log-probs (like vLLM prompt_logprobs / SGLang input logprobs).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from protocol.bus import PermanentError
from protocol.messages import FinishReason, Response, SamplingParams, WeightUpdate

LogprobsMode = Literal["processed", "raw"]


class EngineError(Exception):
    """Base of every engine failure; services map subclasses to HTTP status codes."""


class InvalidRequest(EngineError, PermanentError):
    """The request itself is bad (empty prompt, out-of-vocabulary ids, too long...): a 4xx,
    retrying it unchanged cannot succeed (so the bus dead-letters it at once)."""


class UpstreamError(EngineError):
    """The engine (or the server behind it) failed; retrying later may succeed: a 5xx."""


class WeightUpdateError(EngineError):
    """A weight update was refused (bad hash, missing files, wrong names/shapes, unsupported
    format). The engine keeps serving its previous weights and version."""


class EngineClosed(EngineError):
    """The engine was closed; no further requests are accepted."""


@dataclass
class GenOutput:
    """One sampled response."""

    token_ids: np.ndarray  # int32 [T]
    logprobs: np.ndarray  # float32 [T], per `logprobs_mode`
    finish_reason: FinishReason
    weight_version: int = 0  # version of the weights that produced every token of it
    text: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.token_ids = np.ascontiguousarray(self.token_ids, dtype=np.int32).reshape(-1)
        self.logprobs = np.ascontiguousarray(self.logprobs, dtype=np.float32).reshape(-1)
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"{len(self.token_ids)} tokens but {len(self.logprobs)} log-probs")

    def to_response(self) -> Response:
        return Response(
            token_ids=self.token_ids,
            logprobs=self.logprobs,
            finish_reason=self.finish_reason,
            text=self.text,
        )


class Engine(abc.ABC):
    """What every engine offers. `generate` and `score` may run concurrently from many tasks;
    engines batch them internally."""

    @property
    @abc.abstractmethod
    def version(self) -> int:
        """Version of the weights currently serving (0 = as loaded at start)."""

    @abc.abstractmethod
    async def generate(
        self, prompt_ids: Sequence[int], n: int, params: SamplingParams
    ) -> list[GenOutput]:
        """Sample `n` responses to one prompt (token ids). Raises InvalidRequest on bad input."""

    @abc.abstractmethod
    async def score(
        self, sequences: Sequence[Sequence[int]], response_offsets: Sequence[int]
    ) -> list[np.ndarray]:
        """For each sequence, the raw log-prob of every token at index >= its offset given the
        tokens before it: float32 arrays of length `len(seq) - offset`. Offsets must be >= 1."""

    @abc.abstractmethod
    async def update_weights(self, update: WeightUpdate) -> int:
        """Swap to new weights atomically; returns the new version. On any problem raises
        WeightUpdateError and keeps serving the old weights."""

    @abc.abstractmethod
    async def pause(self) -> None:
        """Stop starting new work: generate/score calls made from now on wait until resume().
        Work already running finishes."""

    @abc.abstractmethod
    async def resume(self) -> None:
        """Undo pause()."""

    @abc.abstractmethod
    async def health(self) -> dict[str, Any]:
        """At least {"ok": bool, "version": int, "paused": bool}."""

    async def close(self) -> None:  # noqa: B027 -- optional hook, not abstract
        """Release resources (threads, HTTP clients). Idempotent."""


# -------------------------------------------------------------------------- validation
def check_prompt(prompt_ids: Sequence[int], n: int, vocab_size: int, max_model_len: int) -> list[int]:
    """Validate one generate request's prompt; returns it as a list of ints."""
    if n < 1:
        raise InvalidRequest(f"n must be >= 1, got {n}")
    ids = check_token_ids(prompt_ids, vocab_size, what="prompt")
    if len(ids) >= max_model_len:
        raise InvalidRequest(
            f"prompt has {len(ids)} tokens; the context window is {max_model_len}, "
            "leaving no room for a response"
        )
    return ids


def check_token_ids(ids: Sequence[int], vocab_size: int, *, what: str = "sequence") -> list[int]:
    try:
        arr = np.asarray(ids)
    except Exception as e:
        raise InvalidRequest(f"{what}: not a sequence of token ids ({e})") from e
    if arr.ndim != 1:
        raise InvalidRequest(f"{what}: expected a flat list of token ids, got shape {arr.shape}")
    if arr.size == 0:
        raise InvalidRequest(f"{what} is empty")
    if arr.dtype.kind not in "iu":
        raise InvalidRequest(f"{what}: token ids must be integers, got {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise InvalidRequest(f"{what}: token id {bad} outside the vocabulary [0, {vocab_size})")
    return arr.astype(np.int64).tolist()


def check_score_request(
    sequences: Sequence[Sequence[int]],
    response_offsets: Sequence[int],
    vocab_size: int,
    max_model_len: int,
) -> list[list[int]]:
    if len(sequences) != len(response_offsets):
        raise InvalidRequest(f"{len(sequences)} sequences but {len(response_offsets)} offsets")
    out = []
    for i, (seq, off) in enumerate(zip(sequences, response_offsets, strict=True)):
        ids = check_token_ids(seq, vocab_size, what=f"sequences[{i}]")
        if len(ids) > max_model_len:
            raise InvalidRequest(f"sequences[{i}] has {len(ids)} tokens > context window {max_model_len}")
        if not 1 <= int(off) <= len(ids):
            raise InvalidRequest(
                f"response_offsets[{i}]={off} must be in [1, {len(ids)}] (the first token has no log-prob)"
            )
        out.append(ids)
    return out
