"""`rlrt export CHECKPOINT --out DIR`: any checkpoint of a run as a Hugging Face model directory
(config.json, generation_config.json, model*.safetensors, tokenizer files), loadable by
`transformers`, vLLM and SGLang.

CHECKPOINT may be
- a trainer checkpoint `<output_dir>/checkpoints/step-00000040` (DeepSpeed, ZeRO 0, 2 or 3, any
  number of ranks), or the checkpoint root / the trainer's output_dir (its latest checkpoint);
- a pushed weight directory `<output_dir>/weights/v00000040` (protocol/weights.py).

A checkpoint holds weights only; the architecture (config.json) and the tokenizer come from the
model the run started from: `trainer.model_path` / `tokenizer_path` in the run's
`<output_dir>/trainer_config.json`, found beside the checkpoint, or `--model`.

Nothing here unpickles arbitrary objects: DeepSpeed's files are read with the trainer's
weights-only loader (trainer/checkpoint.py), weight directories are safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

LATEST = "latest.json"
# The trainer wraps the HF model as `PolicyModel.model` (trainer/model.py): DeepSpeed's names
# carry this prefix.
_WRAPPER_PREFIX = "model."
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ExportError(Exception):
    """The checkpoint or the base model cannot be found or does not fit: one clear line."""


@dataclass
class Exported:
    out: Path
    source: Path
    kind: str  # "deepspeed" | "weights_dir"
    base_model: str
    dtype: str
    params: int


def _resolve(checkpoint: Path) -> tuple[Path, str]:
    """(directory holding the weights, kind) for any of the accepted forms."""
    c = checkpoint
    if not c.exists():
        raise ExportError(f"{c} does not exist")
    if (c / "manifest.json").is_file():
        return c, "weights_dir"
    for root in (c, c / "checkpoints"):
        if (root / LATEST).is_file():
            tag = json.loads((root / LATEST).read_text())["tag"]
            c = root / tag
            break
    if any(c.glob("*model_states.pt")):
        return c, "deepspeed"
    raise ExportError(f"{checkpoint} is not a checkpoint: expected a DeepSpeed step directory "
                      "(*model_states.pt), a checkpoint root or output_dir with latest.json, or a "
                      "pushed weight directory (manifest.json)")


def _trainer_config(source: Path) -> dict[str, Any] | None:
    """The run's saved trainer config, from the nearest directory above the checkpoint."""
    for d in [source, *source.parents][:4]:
        f = d / "trainer_config.json"
        if f.is_file():
            return json.loads(f.read_text())
    return None


def base_model(source: Path, model: str | None) -> tuple[str, str]:
    """(model, tokenizer) paths or hub ids of the architecture and tokenizer to export with."""
    if model is not None:
        return model, model
    cfg = _trainer_config(source)
    if cfg is None or not cfg.get("model_path"):
        raise ExportError(f"no trainer_config.json above {source} names the run's model: pass "
                          "--model (the HF directory or hub id the run started from)")
    return cfg["model_path"], cfg.get("tokenizer_path") or cfg["model_path"]


class _WeightsOnlyTorch:
    """`torch` as DeepSpeed's zero_to_fp32 sees it while we call it: its torch.load(...,
    weights_only=False) goes to the trainer's allow-listed weights-only loader instead."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f: Any, map_location: Any = None, **_: Any) -> Any:
        from trainer.checkpoint import safe_torch_load

        return safe_torch_load(f, map_location)


@contextmanager
def _weights_only_loads(module: Any) -> Iterator[None]:
    real = module.torch
    module.torch = _WeightsOnlyTorch()
    try:
        yield
    finally:
        module.torch = real


def _strip_wrapper(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if sd and all(k.startswith(_WRAPPER_PREFIX) for k in sd):
        return {k[len(_WRAPPER_PREFIX):]: v for k, v in sd.items()}
    return sd


def deepspeed_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    """Full weights of a DeepSpeed step directory, HF names. ZeRO 0/1/2 keep whole weights in
    the model-states file; ZeRO-3 partitions them over the ranks' optimizer files, which
    DeepSpeed's own zero_to_fp32 reassembles (fp32 master weights, any world size)."""
    from trainer.checkpoint import safe_torch_load

    states = sorted(step_dir.glob("*model_states.pt"))
    first = safe_torch_load(states[0], "cpu")
    module: dict[str, torch.Tensor] = first["module"]
    shapes: dict[str, Any] = {}
    for group in first.get("param_shapes") or []:
        shapes.update(group)
    whole = all(module[n].numel() == torch.Size(s).numel() for n, s in shapes.items() if n in module)
    if module and whole and all(v.numel() > 0 for v in module.values()):
        return _strip_wrapper(dict(module))
    from deepspeed.utils import zero_to_fp32

    with _weights_only_loads(zero_to_fp32):
        sd = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    return _strip_wrapper(dict(sd))


def _dtype(name: str, config: Any, sd: dict[str, torch.Tensor]) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    if isinstance(declared, torch.dtype):
        return declared
    return next(v.dtype for v in sd.values() if v.is_floating_point())


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *,
                      model: str | None = None, dtype: str = "auto", force: bool = False) -> Exported:
    """Write CHECKPOINT as an HF model directory at `out` (atomically: built beside it and
    renamed in). `dtype` auto = the base model's declared dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} exists and is not empty (pass --force to replace it)")
    source, kind = _resolve(Path(checkpoint))
    model_path, tokenizer_path = base_model(source, model)
    if kind == "weights_dir":
        from protocol.weights import load_weights_dir

        sd = load_weights_dir(source)
    else:
        sd = deepspeed_state_dict(source)
    try:
        config = AutoConfig.from_pretrained(model_path)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    except OSError as e:
        raise ExportError(f"cannot load the base model's config/tokenizer from {model_path!r} "
                          f"(pass --model): {str(e).splitlines()[0]}") from None
    torch_dtype = _dtype(dtype, config, sd)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    expected = set(hf.state_dict())
    tied = {k for k in expected - set(sd) if k.endswith("lm_head.weight")
            and getattr(config, "tie_word_embeddings", False)}
    missing, extra = expected - set(sd) - tied, set(sd) - expected
    if missing or extra:
        raise ExportError(f"the checkpoint does not fit {model_path}'s architecture: "
                          f"missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
    hf.load_state_dict({k: v.to(torch_dtype) for k, v in sd.items()}, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        hf.tie_weights()  # one tensor again, as save_pretrained expects of tied weights
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        hf.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        try:
            GenerationConfig.from_pretrained(model_path).save_pretrained(str(tmp))
        except OSError:
            pass  # the base model has none: save_pretrained wrote the config's defaults
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Exported(out=out, source=source, kind=kind, base_model=model_path,
                    dtype=str(torch_dtype).removeprefix("torch."),
                    params=sum(p.numel() for p in hf.parameters()))  # tied ones once
