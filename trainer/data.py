"""Training prompts: the rows of the run's `data` section (tasks/data.py: the task's
generator, local files or a hub dataset), rendered by the one `render_prompt` of
tasks/base.py, drawn in a seeded order.

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

from tasks.base import Row, render_row
from tasks.data import DataConfig, DataError, describe, load_table, missing_fields, to_row

log = logging.getLogger("rlrt.trainer.data")

__all__ = ["DataError", "Drawn", "PromptSource"]


@dataclass(frozen=True)
class Drawn:
    """One usable row: where it came from in the stream, and its rendered token ids."""

    row: Row
    prompt_ids: list[int]
    index: int  # row index in the source
    epoch: int
    cursor: int  # stream position of this row


class PromptSource:
    """Rows + chat-template rendering + the epoch/cursor order. Deterministic in `seed`."""

    def __init__(self, cfg: DataConfig, tokenizer: Any, *, max_prompt_tokens: int, seed: int,
                 report_path: str | Path | None = None) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.seed = seed
        self.report_path = Path(report_path) if report_path else None
        self.rows: Any = load_table(cfg, seed=seed)
        # A misnamed column makes every row unusable: one error naming the columns there are,
        # not a skipped-row warning per row before it.
        missing = missing_fields(self.rows, cfg)
        if missing:
            raise DataError(f"data {describe(cfg)}{missing}")
        self.task = cfg.task
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

    def render(self, row: Row) -> list[int]:
        return render_row(self.tokenizer, row, system_prompt=self.cfg.system_prompt,
                          chat_template_kwargs=self.cfg.chat_template_kwargs,
                          chat_template=self.cfg.chat_template)

    def parse(self, index: int) -> tuple[Row | None, list[int], str | None]:
        """The row at `index` as (row, prompt_ids, None), or (None, [], why it is unusable)."""
        row = to_row(self._row(index), index, self.cfg)
        if isinstance(row, str):
            return None, [], row
        ids = self.render(row)
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
        raise DataError(f"no usable row in {len(self.rows)} rows of {describe(self.cfg)}: "
                        f"skipped {dict(self.skipped)}")
