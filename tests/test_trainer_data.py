"""Prompt sources: chat-template rendering, seeded epoch order, and rows that must not be
trained on (missing answer, prompt overflowing the context) reported and skipped."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.tokenizer import char_tokenizer

from trainer.config import DataConfig
from trainer.data import DataError, PromptSource


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def test_countdown_rows_render_through_the_chat_template(tok):
    src = PromptSource(DataConfig(source="countdown", num_prompts=20), tok,
                       max_prompt_tokens=200, seed=3)
    d = src.draw(0)
    assert d.row.task == "countdown" and d.row.solution
    assert d.row.answer.startswith("numbers=")
    text = tok.apply_chat_template([{"role": "user", "content": d.row.prompt}], tokenize=False,
                                   add_generation_prompt=True)
    assert d.prompt_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(d.prompt_ids).endswith("<|im_start|>assistant\n")


def test_epoch_order_is_a_seeded_permutation(tok):
    cfg = DataConfig(source="countdown", num_prompts=12)
    a = PromptSource(cfg, tok, max_prompt_tokens=200, seed=1)
    b = PromptSource(cfg, tok, max_prompt_tokens=200, seed=1)
    first = [a.position(k)[1] for k in range(12)]
    second = [a.position(k)[1] for k in range(12, 24)]
    assert sorted(first) == list(range(12)) and sorted(second) == list(range(12))
    assert first != second  # reshuffled every epoch
    assert first == [b.position(k)[1] for k in range(12)]  # same seed, same order
    # the cursor alone decides: a fresh source agrees at any position (resume)
    assert [a.draw(k).row for k in (5, 17)] == [b.draw(k).row for k in (5, 17)]


def _rows():
    return [
        {"prompt": "What is 2+2?", "answer": "4", "id": "q0"},
        {"prompt": "No answer here", "answer": ""},
        {"prompt": "x" * 120, "answer": "long"},
        {"prompt": "What is 3+3?", "answer": 6, "solution": "3+3=6"},
    ]


def test_jsonl_bad_rows_are_reported_and_skipped(tok, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    report = tmp_path / "skipped.jsonl"
    src = PromptSource(DataConfig(source="jsonl", path=[str(f)], shuffle=False, task="math"),
                       tok, max_prompt_tokens=60, seed=0, report_path=report)
    got = [src.draw(0), src.draw(1)]
    assert [d.row.prompt_id for d in got] == ["q0", "row:3"]
    assert got[1].cursor == 3 and got[1].row.answer == "6" and got[1].row.solution == "3+3=6"
    assert dict(src.skipped) == {"no_answer": 1, "overflow": 1}
    reasons = {json.loads(line)["row"]: json.loads(line)["reason"]
               for line in report.read_text().splitlines()}
    assert reasons == {1: "no_answer", 2: "overflow"}
    # next epoch: counted again, reported once
    src.draw(5)
    assert src.skipped["no_answer"] == 2
    assert len(report.read_text().splitlines()) == 2


def test_parquet_source_and_no_usable_row(tok, tmp_path):
    f = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "hi", "answer": "1"}]), f)
    src = PromptSource(DataConfig(source="parquet", path=[str(f)]), tok,
                       max_prompt_tokens=60, seed=0)
    assert src.draw(0).row.prompt == "hi"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "answer": None}) + "\n")
    src = PromptSource(DataConfig(source="jsonl", path=[str(bad)]), tok, max_prompt_tokens=60,
                       seed=0)
    with pytest.raises(DataError, match="no usable row"):
        src.draw(0)
