"""Render and tokenize chat-formatted examples the same way the rollout engine will:
prompt = chat template with the generation prompt, response tokenized on its own, then EOS.

`chat_prompt` writes the template out by hand (a test checks it equals `apply_chat_template`)
because SFT renders thousands of prompts per second and jinja is slow for that."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast


def chat_prompt(user: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def encode_prompts(tok: PreTrainedTokenizerFast, users: list[str]) -> list[list[int]]:
    return tok([chat_prompt(u) for u in users], add_special_tokens=False)["input_ids"]


def encode_responses(tok: PreTrainedTokenizerFast, responses: list[str]) -> list[list[int]]:
    """Response tokens followed by EOS (`<|im_end|>`), which the model must learn to emit."""
    ids = tok(responses, add_special_tokens=False)["input_ids"]
    return [r + [tok.eos_token_id] for r in ids]
