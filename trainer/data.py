"""Prompts: rows from local JSONL / Parquet files (through `datasets`) or the built-in
synthetic countdown task, rendered through the tokenizer's chat template.

A row is drawn by its *cursor*, a position in an endless stream of epochs, each a seeded
permutation of the rows: the cursor alone (saved in checkpoints) says which row comes next,
so a resumed run draws exactly the rows the killed one would have.

A row that cannot be trained on -- no answer, an empty prompt, or a rendered prompt longer
than the context allows -- is reported (log warning, `data_skipped.jsonl`, counters) and
skipped, never silently sent to the rollout.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config import DataConfig

log = logging.getLogger("rlrt.trainer.data")


class DataError(RuntimeError):
    """The data source is unusable (no file, no usable row, ...)."""


@dataclass(frozen=True)
class PromptRow:
    prompt_id: str
    prompt: str
    answer: str
    solution: str | None
    task: str


@dataclass(frozen=True)
class Drawn:
    """One usable row: where it came from in the stream, and its rendered token ids."""

    row: PromptRow
    prompt_ids: list[int]
    index: int  # row index in the source
    epoch: int
    cursor: int  # stream position of this row


def _countdown_rows(cfg: DataConfig, seed: int) -> list[dict[str, Any]]:
    from protocol.tasks import countdown

    problems = countdown.dataset("train", cfg.num_prompts, seed, **cfg.countdown_knobs)
    return [
        {
            "id": f"countdown:{p.key()}",
            "prompt": p.prompt_text(),
            "answer": p.reference(),
            "solution": p.solution_text(),
        }
        for p in problems
    ]


def _file_rows(cfg: DataConfig) -> Any:
    if not cfg.path:
        raise DataError(f"data.source={cfg.source} needs data.path (one or more local files)")
    import datasets

    builder = "json" if cfg.source == "jsonl" else "parquet"
    try:
        return datasets.load_dataset(builder, data_files=list(cfg.path), split="train")
    except FileNotFoundError as e:
        raise DataError(f"data file not found: {e}") from e


class PromptSource:
    """Rows + chat-template rendering + the epoch/cursor order. Deterministic in `seed`."""

    def __init__(self, cfg: DataConfig, tokenizer: Any, *, max_prompt_tokens: int, seed: int,
                 report_path: str | Path | None = None) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.seed = seed
        self.report_path = Path(report_path) if report_path else None
        if cfg.source == "countdown":
            self.rows: Any = _countdown_rows(cfg, seed)
            self.task = "countdown"
        else:
            self.rows = _file_rows(cfg)
            self.task = cfg.task
        if len(self.rows) == 0:
            raise DataError(f"data source {cfg.source} {cfg.path} has no rows")
        self.skipped: Counter[str] = Counter()
        self._reported: set[int] = set()
        self._perm_epoch = -1
        self._perm: list[int] = []

    def __len__(self) -> int:
        return len(self.rows)

    # ------------------------------------------------------------------ order
    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            order = list(range(len(self.rows)))
            if self.cfg.shuffle:
                random.Random(f"{self.seed}:epoch:{epoch}").shuffle(order)
            self._perm, self._perm_epoch = order, epoch
        return self._perm

    def position(self, cursor: int) -> tuple[int, int]:
        """(epoch, row index) at a stream position."""
        n = len(self.rows)
        epoch = cursor // n
        return epoch, self._permutation(epoch)[cursor % n]

    # ------------------------------------------------------------------ rows
    def _row(self, index: int) -> dict[str, Any]:
        return dict(self.rows[index])

    def render(self, prompt: str) -> list[int]:
        """Chat template with the generation prompt, then tokens without added specials (the
        template already holds them): the same rendering as protocol.teacher's contexts."""
        messages = []
        if self.cfg.system_prompt:
            messages.append({"role": "system", "content": self.cfg.system_prompt})
        messages.append({"role": "user", "content": prompt})
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **self.cfg.chat_template_kwargs
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def parse(self, index: int) -> tuple[PromptRow | None, list[int], str | None]:
        """The row at `index` as (row, prompt_ids, None), or (None, [], why it is unusable)."""
        raw = self._row(index)
        prompt = raw.get(self.cfg.prompt_field)
        answer = raw.get(self.cfg.answer_field)
        if not isinstance(prompt, str) or not prompt.strip():
            return None, [], "no_prompt"
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            return None, [], "no_answer"
        solution = raw.get(self.cfg.solution_field)
        pid = raw.get(self.cfg.id_field)
        row = PromptRow(
            prompt_id=str(pid) if pid is not None else f"row:{index}",
            prompt=prompt,
            answer=str(answer),
            solution=str(solution) if solution else None,
            task=self.task,
        )
        ids = self.render(prompt)
        if len(ids) > self.max_prompt_tokens:
            return None, ids, "overflow"
        return row, ids, None

    def _report(self, index: int, reason: str, tokens: int) -> None:
        self.skipped[reason] += 1
        if index in self._reported:  # seen again in a later epoch: counted, not re-reported
            return
        self._reported.add(index)
        detail = f" ({tokens} tokens > {self.max_prompt_tokens})" if reason == "overflow" else ""
        log.warning("data: skipping row %d: %s%s", index, reason, detail)
        if self.report_path is not None:
            self.report_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.report_path, "a") as f:
                f.write(json.dumps({"row": index, "reason": reason, "tokens": tokens,
                                    "max_prompt_tokens": self.max_prompt_tokens}) + "\n")

    def draw(self, cursor: int) -> Drawn:
        """The first usable row at or after `cursor`. Skipped rows are reported. Raises
        DataError when a whole epoch's worth of rows in a row is unusable."""
        for k in range(cursor, cursor + len(self.rows)):
            epoch, index = self.position(k)
            row, ids, why = self.parse(index)
            if row is not None:
                return Drawn(row=row, prompt_ids=ids, index=index, epoch=epoch, cursor=k)
            self._report(index, why or "unknown", len(ids))
        raise DataError(f"no usable row in {len(self.rows)} rows of {self.cfg.source} "
                        f"{self.cfg.path}: skipped {dict(self.skipped)}")
