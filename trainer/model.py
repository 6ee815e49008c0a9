"""The policy: any HF causal LM from a local directory, inside a DeepSpeed engine.

- ZeRO stage 0, 2 or 3; fp32 on CPU (gloo), bf16 on GPU (nccl); one code path for both.
- The optimizer is a client `torch.optim.AdamW`: DeepSpeed's own Adam kernels JIT-compile
  (minutes on 2 CPU cores); the torch one needs nothing built. Clipping is DeepSpeed's
  (`gradient_clipping`), the warm-up schedule a `LambdaLR` stepped by the engine.
- Gradient accumulation is unmanaged (`managed_gradient_accumulation: false`): the number of
  micro-batches changes from step to step (zero-variance drops, response lengths), so
  `backward()` only accumulates and `step()` reduces and updates, whatever the count.
- ZeRO-3 builds the model inside `deepspeed.zero.Init` and loads the safetensors shard by
  shard into the partitions (what `HfDeepSpeedConfig` + `from_pretrained` does, minus its
  `accelerate` dependency), so no rank ever holds the whole model before training.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.algorithm import token_logprobs
from trainer.algorithm.shared_prompt import prompt_groups
from trainer.config import TrainerConfig

log = logging.getLogger("rlrt.trainer.model")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(cfg: TrainerConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(cfg: TrainerConfig, device: str) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return DTYPES[cfg.dtype]


class PolicyModel(nn.Module):
    """The HF model wrapped so that the engine's forward returns the log-probs (and entropy)
    of given tokens, computed by the algorithm's memory-safe chunked `token_logprobs`.

    Why a wrapper: that function reads `lm_head.weight` directly (F.linear per chunk). Under
    ZeRO-3 a parameter is only whole while a module that owns it runs; inside this module's
    forward, DeepSpeed catches the access as an "external parameter", gathers it for the
    forward and again for the backward. Called from outside any forward it would see an
    empty partition. Returning plain tensors (not a dataclass) lets ZeRO-3 hook the outputs.
    """

    def __init__(self, model: nn.Module, *, chunk_size: int, temperature: float,
                 share_prompts: bool = False) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.temperature = temperature
        self.share_prompts = share_prompts  # trainer.share_prompts
        self._share_checked = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                logprob_mask: torch.Tensor, with_entropy: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.share_prompts and not self._share_checked:
            self._check_shared(input_ids, attention_mask, logprob_mask)
        out = token_logprobs(self.model, input_ids, attention_mask, logprob_mask=logprob_mask,
                             temperature=self.temperature, chunk_size=self.chunk_size,
                             with_entropy=with_entropy, share_prompts=self.share_prompts)
        ent = out.entropy if out.entropy is not None else out.logprobs.new_zeros(0)
        return out.logprobs, ent

    @torch.no_grad()
    def _check_shared(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      logprob_mask: torch.Tensor) -> None:
        """On the first micro-batch that shares a prompt: the shared forward must give the
        plain one's log-probs (a model whose attention or cache it does not fit would not)."""
        want = logprob_mask.bool()
        if prompt_groups(input_ids, attention_mask, want) is None:
            return  # nothing shared here: check on a later micro-batch
        self._share_checked = True
        kw = dict(logprob_mask=logprob_mask, temperature=self.temperature,
                  chunk_size=self.chunk_size)
        plain = token_logprobs(self.model, input_ids, attention_mask, **kw).logprobs[want]
        shared = token_logprobs(self.model, input_ids, attention_mask, share_prompts=True,
                                **kw).logprobs[want]
        diff = (plain - shared).abs()
        fp32 = next(self.model.parameters()).dtype == torch.float32
        # fp32: float rounding only. bf16/fp16 forwards of different shapes differ by a few
        # hundredths of a nat on average; a structural mismatch (a wrong position, mask or
        # prompt state) moves the tokens it touches by nats.
        ok = bool(diff.max() <= 1e-3) if fp32 else bool(
            diff.mean() <= 0.1 and (diff > 1.0).float().mean() <= 1e-3)
        if not ok:
            self.share_prompts = False
            log.warning("trainer.share_prompts: the shared-prompt forward differs from the "
                        "plain one on this model (max |delta log-prob| %.3g, mean %.3g); the "
                        "plain forward is used", float(diff.max()), float(diff.mean()))
        else:
            log.info("trainer.share_prompts: checked against the plain forward (max |delta "
                     "log-prob| %.2g)", float(diff.max()))


def ds_config(cfg: TrainerConfig, world_size: int, dtype: torch.dtype) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        # The pushed / exported weights are gathered by us per bucket, not by DeepSpeed.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        # Bookkeeping values only: we feed micro-batches ourselves and step when we decide.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


# --------------------------------------------------------------------------- loading


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path} (only safetensors checkpoints are loaded)")
    return files


def _load_zero3(path: Path, ds_cfg: dict[str, Any], dtype: torch.dtype, rank: int) -> nn.Module:
    import deepspeed
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(path)
    # Resolve (import) the model class and enter no_init_weights BEFORE zero.Init: zero.Init
    # patches torch.Tensor.__new__, and a module imported under the patch that pulls in
    # torch._dynamo fails its signature check.
    import torch._dynamo  # noqa: F401

    model_cls = AutoModelForCausalLM._model_mapping[type(config)]
    # no_init_weights: the random init would be overwritten anyway, and HF's init indexes
    # rows of (empty) partitions. It also skips the tying done by init_weights: redo it.
    # No `dtype=` for zero.Init: deepspeed 0.19.8 ignores an explicit dtype on CPU (operator
    # precedence in Init._set_dtype picks bf16); from the config alone it uses fp32, or bf16
    # when the config enables bf16 -- which is what we want.
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_cfg):
        model = model_cls._from_config(config, dtype=dtype)
        model.tie_weights()
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    loaded: set[str] = set()
    for file in _safetensors_files(path):
        with safe_open(str(file), "pt") as f:
            keys = list(f.keys())
            for i in range(0, len(keys), 64):  # a few params per gather: fewer collectives
                chunk = [k for k in keys[i:i + 64] if k in params]
                with deepspeed.zero.GatheredParameters([params[k] for k in chunk], modifier_rank=0):
                    if rank == 0:
                        for k in chunk:
                            params[k].data.copy_(f.get_tensor(k))
                loaded.update(chunk)
                for k in keys[i:i + 64]:
                    if k in buffers:
                        buffers[k].copy_(f.get_tensor(k))
                        loaded.add(k)
                    elif k not in params:
                        log.warning("checkpoint tensor %s matches no parameter; ignored", k)
    missing = set(params) - loaded
    if missing:
        raise ValueError(f"{path}: no weights for {sorted(missing)[:8]} ({len(missing)} params)")
    return model


def load_hf_model(path: str, dtype: torch.dtype, *, zero3_ds_config: dict[str, Any] | None,
                  rank: int) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if zero3_ds_config is not None:
        return _load_zero3(Path(path), zero3_ds_config, dtype, rank)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


# --------------------------------------------------------------------------- optimizer


def _shape(p: nn.Parameter) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 partitions report an empty shape


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: biases and norm scales (1-D) are not shrunk toward 0."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if len(_shape(p)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(cfg: TrainerConfig) -> Callable[[int], float]:
    """Multiplier of the peak lr at RL step `s` (0-based): linear warm-up from 0 (s/warmup,
    as verl's get_constant/cosine_schedule_with_warmup: the first step runs at lr 0, which
    still fills AdamW's moments), then constant or a decay to min_lr_ratio at total_steps."""
    warm, total, floor = cfg.warmup_steps, cfg.total_steps, cfg.min_lr_ratio

    def f(s: int) -> float:
        if s < warm:
            return s / warm
        if cfg.lr_schedule == "constant" or total <= warm:
            return 1.0
        frac = min(1.0, (s - warm) / max(1, total - warm))
        if cfg.lr_schedule == "linear":
            return floor + (1 - floor) * (1 - frac)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))

    return f


class RLStepLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR advanced once per RL step, not per optimizer update. DeepSpeed's engine.step()
    calls `step(**lr_kwargs)` after every update; with PPO mini-batches a step makes several,
    and the trainer passes advance=False for all but the last (verl steps its lr scheduler
    once per RL step, so warm-up and decay count RL steps)."""

    def step(self, advance: bool = True) -> None:  # type: ignore[override]
        if advance:
            super().step()


# --------------------------------------------------------------------------- the engine


@dataclass
class Policy:
    engine: Any  # deepspeed.DeepSpeedEngine wrapping a PolicyModel
    hf_model: nn.Module  # the HF model inside it (for names, config, export)
    device: str
    dtype: torch.dtype
    zero_stage: int
    rank: int
    world_size: int

    @property
    def zero3(self) -> bool:
        return self.zero_stage == 3

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                logprob_mask: torch.Tensor, with_entropy: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.device if self.device == "cpu" else self.engine.device
        return self.engine(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev),
                           logprob_mask=logprob_mask.to(dev), with_entropy=with_entropy)


def shares_prompts(cfg: TrainerConfig, world_size: int) -> bool:
    """trainer.share_prompts where it applies: one trainer process (each rank decides per
    micro-batch, and a shared forward readies the gradients in another order than the plain
    one: ZeRO's bucketed reductions would pair different buckets across ranks; ZeRO-3
    also gathers per module call), without activation checkpointing (no cache in training)."""
    return cfg.share_prompts and world_size == 1 and not cfg.gradient_checkpointing


def build_policy(cfg: TrainerConfig, *, rank: int, world_size: int, device: str) -> Policy:
    import deepspeed

    dtype = resolve_dtype(cfg, device)
    ds = ds_config(cfg, world_size, dtype)
    hf = load_hf_model(cfg.model_path, dtype, zero3_ds_config=ds if cfg.zero_stage == 3 else None,
                       rank=rank)
    if cfg.gradient_checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.config.use_cache = False
    wrapper = PolicyModel(hf, chunk_size=cfg.logprob_chunk_size, temperature=cfg.temperature,
                          share_prompts=shares_prompts(cfg, world_size))
    opt = torch.optim.AdamW(param_groups(hf, cfg.weight_decay), lr=cfg.lr,
                            betas=cfg.adam_betas, eps=cfg.adam_eps)
    sched = RLStepLR(opt, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=wrapper, optimizer=opt, lr_scheduler=sched,
                                           config=ds, dist_init_required=False)
    engine.train()
    if cfg.zero_stage == 0:
        _record_grad_norm(engine)
    return Policy(engine=engine, hf_model=hf, device=device, dtype=dtype,
                  zero_stage=cfg.zero_stage, rank=rank, world_size=world_size)


def _record_grad_norm(engine: Any) -> None:
    """Stage 0 in fp32 clips with `clip_fp32_gradients` and throws the norm away (ZeRO
    optimizers keep theirs); keep it, so `get_global_grad_norm()` answers on every stage."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip() -> None:
        engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                    max_norm=engine.gradient_clipping(),
                                                    mpu=engine.mpu)

    engine.clip_fp32_gradients = clip


# --------------------------------------------------------------------------- full weights


def named_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters (tied ones once, as save_pretrained writes them) and persistent buffers."""
    out: list[tuple[str, torch.Tensor]] = list(model.named_parameters())
    persistent = set(model.state_dict().keys())
    out += [(n, b) for n, b in model.named_buffers() if n in persistent]
    return out


def numel_of(t: torch.Tensor) -> int:
    """Real element count: under ZeRO-3 `numel()` is the local partition (often 0)."""
    return int(getattr(t, "ds_numel", t.numel()))


def shape_of(t: torch.Tensor) -> list[int]:
    """Real shape: under ZeRO-3 `shape` is empty outside GatheredParameters."""
    return [int(x) for x in getattr(t, "ds_shape", t.shape)]


def plan_buckets(items: list[tuple[str, torch.Tensor]], bucket_bytes: int,
                 dtype: torch.dtype | None = None) -> list[list[int]]:
    """Indices of `items` per bucket, planned by protocol.weights.plan_buckets (the one plan,
    shared with the NCCL wire format) from the real shapes: under ZeRO-3 `numel()` is the
    local partition, and sizing by it would put the whole model in one bucket."""
    from protocol.weights import plan_buckets as plan

    buckets = plan([(n, str(dtype or t.dtype).removeprefix("torch."), shape_of(t))
                    for n, t in items], bucket_bytes)
    out: list[list[int]] = []
    i = 0
    for b in buckets:
        out.append(list(range(i, i + len(b.names))))
        i += len(b.names)
    return out


def iter_gathered(policy: Policy, bucket_bytes: int, dtype: torch.dtype | None = None,
                  plan: list[list[int]] | None = None
                  ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Full weights, one bucket of `plan` (default: plan_buckets) at a time, as tensors on
    the training device valid until the next bucket. A collective under ZeRO-3: every rank
    must iterate; only rank 0's tensors are meaningful."""
    import deepspeed

    items = named_weights(policy.hf_model)
    for idx in plan if plan is not None else plan_buckets(items, bucket_bytes, dtype):
        chunk = [items[i] for i in idx]
        params = [t for _, t in chunk if hasattr(t, "ds_id")]
        with deepspeed.zero.GatheredParameters(params, enabled=policy.zero3 and bool(params)):
            yield [(n, t.detach().to(dtype) if dtype is not None else t.detach())
                   for n, t in chunk]


def full_state_dict(policy: Policy, dtype: torch.dtype | None = None,
                    bucket_bytes: int = 512 * 1024**2, *, copy: bool = True
                    ) -> dict[str, torch.Tensor] | None:
    """The whole model as CPU tensors on rank 0 (None elsewhere). Collective under ZeRO-3.
    copy=False may return the live CPU parameters themselves (ZeRO 0/2 on CPU): valid only
    until the next optimizer step, and saves copying the whole model for a push that
    completes before it."""
    out: dict[str, torch.Tensor] = {}
    for bucket in iter_gathered(policy, bucket_bytes, dtype):
        if policy.rank == 0:
            for name, t in bucket:
                # a gathered ZeRO-3 tensor is freed after its bucket: always copy it
                keep = copy or policy.zero3
                out[name] = t.to("cpu", copy=keep).contiguous()
    return out if policy.rank == 0 else None


def export_pretrained(policy: Policy, out_dir: str | Path, tokenizer: Any | None) -> Path | None:
    """save_pretrained layout (config.json, generation_config.json, model*.safetensors,
    tokenizer files): what SGLang and vLLM load. Written beside the target and renamed in."""
    sd = full_state_dict(policy)
    if policy.rank != 0:
        return None
    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    policy.hf_model.save_pretrained(str(tmp), state_dict=sd, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
