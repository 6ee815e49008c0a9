"""Judging the update steps: a device run's weights against the fp32 CPU reference's."""

from __future__ import annotations

from typing import Any

import torch

# How close "close" is. fp32 against fp32 (the --cpu rehearsal: ZeRO 2/3 against stage 0)
# differs only by summation order. bf16 against fp32, measured with DeepSpeed's bf16 on CPU
# (this check's update case and model, 2026-12-07): ZeRO 2 and 3 cosine 0.9993, relative error
# 0.037 -- the tolerance leaves 4x that. ZeRO 0 gave cosine 0.995 and relative error 0.27 (an
# update 25% smaller in norm: DeepSpeed wraps the optimizer in FP16_UnfusedOptimizer for bf16
# at stage 0; no step was skipped, the gradient norms agree): it fails here, on purpose, until
# the GPU run says whether CUDA does the same (docs/gpu.md). The losses of this case are ~1e-5,
# so the loss bound only catches gross failures.
TOLERANCE = {"fp32": {"cosine": 0.9999, "rel_err": 1e-3, "loss": 1e-4},
             "bf16": {"cosine": 0.99, "rel_err": 0.15, "loss": 0.05}}


def update_agreement(init: dict[str, torch.Tensor], got: dict[str, torch.Tensor],
                     ref: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, Any]:
    """Each run's update (weights after minus weights before, the "before" rounded to the run's
    dtype), flattened: cosine and relative error of `got`'s against `ref`'s, and which tensors
    did not move at all."""
    d_got, d_ref, still = [], [], []
    for name, w0 in init.items():
        a = got[name].double() - w0.to(dtype).double()
        b = ref[name].double() - w0.double()
        if not bool(a.abs().max() > 0):
            still.append(name)
        d_got.append(a.reshape(-1))
        d_ref.append(b.reshape(-1))
    g, r = torch.cat(d_got), torch.cat(d_ref)
    return {"cosine": float(torch.nn.functional.cosine_similarity(g, r, dim=0)),
            "rel_err": float((g - r).norm() / r.norm()), "not_moved": still,
            "update_norm": float(g.norm()), "ref_update_norm": float(r.norm())}


def judge(stage: int, agree: dict[str, Any], losses: list[float], ref_losses: list[float],
          finite: bool, precision: str) -> dict[str, Any]:
    tol = TOLERANCE[precision]
    loss_diff = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(losses, ref_losses, strict=True))
    problems = []
    if not finite:
        problems.append("non-finite weights")
    if agree["not_moved"]:
        problems.append(f"{len(agree['not_moved'])} tensors did not move")
    if agree["cosine"] < tol["cosine"]:
        problems.append(f"update cosine {agree['cosine']:.4g} < {tol['cosine']}")
    if agree["rel_err"] > tol["rel_err"]:
        problems.append(f"update rel_err {agree['rel_err']:.3g} > {tol['rel_err']}")
    if not loss_diff <= tol["loss"]:
        problems.append(f"loss differs by {loss_diff:.3g} > {tol['loss']}")
    return {"name": f"zero{stage}_update", "ok": not problems, "problems": problems,
            "losses": losses, "ref_losses": ref_losses, "loss_rel_diff": loss_diff,
            "tolerance": tol, **{k: v for k, v in agree.items() if k != "not_moved"},
            "not_moved": agree["not_moved"][:8]}
