"""The tests' tokenizer: character-level, with the bootstrap's special tokens and chat template
(trainer/bootstrap/tokenizer.py), so any ASCII text round-trips exactly and one character is
one token (tests can size prompts in characters)."""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from trainer.bootstrap.tokenizer import CHAT_TEMPLATE, IM_END, IM_START, PAD, SPECIAL_TOKENS, UNK

CONTEXT_LEN = 256  # the tiny models' context: small, so "longer than the context" is cheap


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Every printable ASCII character is a token (BPE without merges); the chat markers are
    special tokens. Ids: the specials first (pad 0, <|im_start|> 1, <|im_end|> = eos 2)."""
    vocab: dict[str, int] = {}
    for t in [*SPECIAL_TOKENS, *string.printable]:
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, ignore_merges=True))
    # [\s\S], not ".": a newline is a character too
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=PAD,
                                   unk_token=UNK, additional_special_tokens=[IM_START],
                                   chat_template=CHAT_TEMPLATE, model_max_length=CONTEXT_LEN)
