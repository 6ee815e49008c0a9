"""A small tokenizer for the tiny bootstrap model, saved as a `PreTrainedTokenizerFast`.

Vocabulary: the special tokens, every printable ASCII character, and the words of the task's
prompt, answer and teacher templates as whole tokens (with and without a leading space, GPT
style). Digits are always single characters, so numbers share one set of embeddings.

Why BPE with `ignore_merges` and no merges: a pre-token (a word, a digit, a space, a symbol)
found in the vocabulary is emitted whole; any other word falls back to its characters. So
every ASCII string round-trips exactly, and the template text stays short (fewer tokens =
faster SFT on 2 cores). Only non-ASCII characters become `<|unk|>`.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tasks import countdown
from tasks.teacher import render_teacher_prompt

PAD, IM_START, IM_END, UNK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, UNK]

# Qwen3-style chat template (without the thinking machinery): each message is
# <|im_start|>{role}\n{content}<|im_end|>\n and the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# A word (optionally with its leading space), a single digit, a single whitespace character,
# or a single other symbol. Covers every character, so nothing is dropped.
PRETOKEN_PATTERN = r" ?[A-Za-z]+|\d|\s|[^A-Za-z\d\s]"


def _template_words() -> list[str]:
    """Words that appear in every prompt/response/teacher context, found by rendering one
    example of each (so the vocabulary follows the templates if they change)."""
    p = countdown.generate(1, seed=0)[0]
    texts = [
        p.prompt_text(),
        p.solution_text(),
        render_teacher_prompt(p.prompt_text(), p.solution_text()),
        "system user assistant",
    ]
    words = set()
    for t in texts:
        words.update(re.findall(r"[A-Za-z]+", t))
    return sorted(w for word in words for w in (word, " " + word))


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab: dict[str, int] = {}
    for tok in [*SPECIAL_TOKENS, *string.printable, *_template_words()]:
        vocab.setdefault(tok, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PRETOKEN_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()  # tokens carry their own spaces: concatenate, add nothing
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        padding_side="left",  # batched generation; SFT pads on the right itself
    )


def save_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    tok = build_tokenizer()
    tok.save_pretrained(str(out_dir))
    return tok
