"""The `data` section: which task, where its rows come from, how a row's fields map onto a
prompt. One model for training (the trainer), evaluation (`rlrt eval`, the eval sets of
`rlrt train`) and `rlrt inspect`, so they cannot disagree on a row.

    data:
      task: math                         # or countdown, or "mypkg.tasks:MyTask"
      path: examples/byo/maths.jsonl     # or hf_dataset: org/name (HF cache, see tasks/hub.py)
      prompt_field: question
      answer_field: answer
      system_prompt: "Put the final answer after 'Answer:'."

Rows come from `path` (local JSONL / JSON / Parquet / Arrow / CSV files, or a directory),
from `hf_dataset` (a hub dataset, through the HF cache), or else from the task's own generator
(Countdown). Loading files goes through `datasets`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks import get_task
from tasks.base import Row, as_messages

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow",
             ".csv": "csv"}


class DataError(RuntimeError):
    """The data source is unusable (no file, no usable row, ...)."""


# Keys of the run's data section an evaluation set with its own `path` / `hf_dataset` / `task`
# inherits (rlrt/run_config.py): its rows are read and rendered like the training rows.
INHERITED = ("prompt_field", "answer_field", "solution_field", "id_field", "system_prompt",
             "chat_template_kwargs", "chat_template")


class DataConfig(BaseModel):
    """Where the prompts come from and how they become `PromptTask.prompt_ids`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    task: str = Field(
        "countdown",
        description="the task (rows, rendering, grading): a built-in name (countdown, math) or "
        "a 'module:Class' path of a tasks.base.Task subclass. Stamped into "
        "PromptTask.task for the verifier. Default: countdown, or math when `path` or "
        "`hf_dataset` is given",
    )
    source: Literal["auto", "countdown", "jsonl", "parquet", "arrow", "csv"] = Field(
        "auto",
        description="auto: `hf_dataset` if set, else the files of `path` (format from their "
        "extension), else the task's generator; the other values force one (countdown = the "
        "generator; jsonl/parquet/... = the files' format)",
    )
    path: list[str] = Field(
        default_factory=list,
        description="local data file(s) (globs allowed, as `datasets` data_files) or one directory",
    )
    hf_dataset: str | None = Field(
        None, description="a Hugging Face Hub dataset id, fetched into (or read offline from) "
        "the HF cache"
    )
    hf_config: str | None = Field(None, description="hf_dataset: its configuration (subset) name")
    revision: str | None = Field(None, description="hf_dataset: branch, tag or commit")
    split: str = Field(
        "train",
        description="split to read: a `datasets` split of the files / hub dataset; for a "
        "generator task 'train' or 'heldout' (which never share a problem)",
    )
    prompt_field: str = Field(
        "prompt", description="column holding the question: a string, or a conversation as "
        "a list of {role, content} turns ending with the user's (TRL's conversational format; "
        "the earlier turns are rendered before it, for the student and the teacher alike)")
    answer_field: str = Field("answer", description="column holding the reference final answer")
    solution_field: str = Field(
        "solution", description="column holding an optional reference solution (teacher context)"
    )
    id_field: str = Field(
        "id", description="column holding a stable prompt id; absent = 'row:<row index>'"
    )
    num_prompts: int = Field(
        10_000, ge=1, description="generator tasks: how many distinct problems to generate"
    )
    knobs: dict[str, int | float | str] = Field(
        default_factory=dict,
        validation_alias=AliasChoices("knobs", "countdown_knobs"),
        description="generator settings of the task (countdown: num_numbers, max_number, "
        "min_target, max_target, min_used, ops); empty = the generator's defaults",
    )
    system_prompt: str | None = Field(
        None, description="optional system message rendered before the user turn (the "
        "student's prompt and the teacher's context alike)"
    )
    chat_template_kwargs: dict[str, object] = Field(
        default_factory=dict,
        description="extra apply_chat_template arguments (e.g. {'enable_thinking': False}); "
        "also sent to the teacher so it renders its context the same way",
    )
    chat_template: str | None = Field(
        None, description="how a prompt becomes tokens: None = the model's own chat template; "
        "'raw' = no template, the prompt text as it is (base models; system_prompt is put "
        "before it); 'chatml' (a named template), a .jinja file or a template text = that "
        "template instead of the model's (tasks/base.py, render_prompt)",
    )
    max_prompt_tokens: int | None = Field(
        None,
        ge=1,
        description="a rendered prompt longer than this is reported and skipped; None = "
        "max_seq_len - sampling.max_new_tokens",
    )
    shuffle: bool = Field(True, description="reshuffle the rows every epoch (seeded by the run seed)")

    @field_validator("path", mode="before")
    @classmethod
    def _one_path(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _defaults(self) -> DataConfig:
        if self.path and self.hf_dataset:
            raise ValueError("give `path` or `hf_dataset`, not both")
        if "task" not in self.model_fields_set and (self.path or self.hf_dataset):
            self.task = "math"
        return self

    def inherited(self) -> dict[str, Any]:
        """What an evaluation set with data of its own takes from the run's data unless it sets
        it: the field mapping and the rendering (the same columns, prompts rendered alike)."""
        return {k: getattr(self, k) for k in INHERITED}

    @property
    def kind(self) -> Literal["generator", "files", "hub"]:
        if self.source == "countdown":
            return "generator"
        if self.hf_dataset:
            return "hub"
        if self.path or self.source != "auto":
            return "files"
        return "generator"


def _load_files(cfg: DataConfig) -> Any:
    import datasets

    if not cfg.path:
        raise DataError(f"data.source={cfg.source} needs data.path (one or more local files)")
    if len(cfg.path) == 1 and Path(cfg.path[0]).is_dir():
        return datasets.load_dataset(cfg.path[0], split=cfg.split)
    for p in cfg.path:
        if any(c in p for c in "*?["):
            continue  # a glob: `datasets` says when it matches nothing
        if not Path(p).exists():
            raise DataError(f"data file {p} does not exist (data.path; relative paths are "
                            f"from {Path.cwd()})")
        if Path(p).is_file() and Path(p).stat().st_size == 0:
            raise DataError(f"data file {p} is empty: no rows to train on")
    exts = {Path(p).suffix.lower() for p in cfg.path}
    builder = {"jsonl": "json"}.get(cfg.source, cfg.source)
    if builder == "auto":
        kinds = {_BUILDERS.get(e) for e in exts}
        if len(kinds) != 1 or None in kinds:
            raise DataError(f"data.path {cfg.path}: cannot tell the format from the extension(s) "
                            f"{sorted(exts)}; use {sorted(_BUILDERS)} or set data.source")
        builder = kinds.pop()
    try:
        return datasets.load_dataset(builder, data_files={cfg.split: list(cfg.path)},
                                     split=cfg.split)
    except FileNotFoundError as e:
        raise DataError(f"data file not found: {e}") from None
    except StopIteration:  # what `datasets` raises on files without a single row (or blank)
        raise DataError(f"data.path {cfg.path}: no rows (empty or blank files)") from None


def _load_hub(cfg: DataConfig) -> Any:
    import datasets

    from tasks.hub import HubError, resolve

    try:
        local = resolve(cfg.hf_dataset or "", "dataset", revision=cfg.revision)
    except HubError as e:
        raise DataError(str(e)) from None
    try:
        return datasets.load_dataset(str(local), name=cfg.hf_config, split=cfg.split)
    except ValueError as e:  # an unknown split or config: datasets names the ones there are
        raise DataError(f"hf_dataset {cfg.hf_dataset!r}: {e}") from None


def load_table(cfg: DataConfig, *, seed: int, n: int | None = None) -> Sequence[Mapping[str, Any]]:
    """The raw rows of split `cfg.split` (a `datasets.Dataset` or a list of dicts), in source
    order. Generator tasks make `n` (default `num_prompts`) rows from `seed`."""
    if cfg.kind == "generator":
        rows = get_task(cfg.task, cfg.knobs or None).generate(cfg.split, n or cfg.num_prompts, seed)
        if rows is None:
            raise DataError(f"task {cfg.task!r} generates no rows: give data.path or data.hf_dataset")
        table: Any = rows
    else:
        table = _load_hub(cfg) if cfg.kind == "hub" else _load_files(cfg)
    if len(table) == 0:
        raise DataError(f"data {describe(cfg)} has no rows")
    return table


def describe(cfg: DataConfig) -> str:
    where = cfg.hf_dataset or (", ".join(cfg.path) if cfg.path else f"{cfg.task} generator")
    return f"{where} (split {cfg.split})"


def to_row(raw: Mapping[str, Any], index: int, cfg: DataConfig) -> Row | str:
    """Raw row -> Row through the field mapping, or why the row is unusable ('no_prompt',
    'no_answer'). A row's own `task` column wins over the section's (mixed files)."""
    prompt = raw.get(cfg.prompt_field)
    answer = raw.get(cfg.answer_field)
    messages = None
    if isinstance(prompt, (list, tuple)):  # a conversation: its last turn is the question
        turns = as_messages(prompt)
        if isinstance(turns, str):
            return turns
        messages, prompt = turns, turns[-1]["content"]
    if not isinstance(prompt, str) or not prompt.strip():
        return "no_prompt"
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        return "no_answer"
    solution = raw.get(cfg.solution_field)
    pid = raw.get(cfg.id_field)
    task = raw.get("task") if cfg.kind != "generator" and isinstance(raw.get("task"), str) else None
    used = {cfg.prompt_field, cfg.answer_field, cfg.solution_field, cfg.id_field, "task"}
    return Row(prompt_id=str(pid) if pid is not None else f"row:{index}", prompt=prompt,
               answer=str(answer), solution=str(solution) if solution else None,
               task=task or cfg.task, messages=messages,
               fields={k: v for k, v in raw.items() if k not in used and _plain(v)})


def _plain(v: Any) -> bool:
    """A value that travels in a message as it is (the bus packs plain data only)."""
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    return v is None or isinstance(v, (str, int, float, bool))


def usable_rows(table: Sequence[Mapping[str, Any]], cfg: DataConfig,
                n: int | None = None) -> tuple[list[Row], dict[str, int]]:
    """The first `n` usable rows of `table` (all when None), in order, and how many rows were
    skipped for each reason (`to_row`'s 'no_prompt', 'no_answer', ...)."""
    rows: list[Row] = []
    skipped: dict[str, int] = {}
    for i in range(len(table)):
        r = to_row(table[i], i, cfg)
        if isinstance(r, str):
            skipped[r] = skipped.get(r, 0) + 1
            continue
        rows.append(r)
        if n is not None and len(rows) == n:
            break
    return rows, skipped


def load_rows(cfg: DataConfig, *, seed: int, n: int | None = None) -> list[Row]:
    """The first `n` usable rows (all when None), in source order: evaluation and inspection.
    Raises DataError when there is none, naming why rows were unusable."""
    table = load_table(cfg, seed=seed, n=n)
    rows, skipped = usable_rows(table, cfg, n)
    if not rows:
        raise DataError(f"no usable row in {describe(cfg)}: skipped {skipped}"
                        + missing_fields(table, cfg))
    return rows


def columns(table: Sequence[Mapping[str, Any]]) -> list[str]:
    """The table's column names (a `datasets.Dataset`'s, or the first rows' keys)."""
    names = getattr(table, "column_names", None)
    if names is not None:
        return list(names)
    seen: dict[str, None] = {}
    for i in range(min(len(table), 100)):
        seen.update(dict.fromkeys(table[i]))
    return list(seen)


def missing_fields(table: Sequence[Mapping[str, Any]], cfg: DataConfig) -> str:
    """'' when the prompt and answer columns exist, else a sentence naming the columns there
    are and the keys to set (so a typo in a field name is one line, not a skipped row each)."""
    have = columns(table)
    lost = [(key, name) for key, name in (("prompt_field", cfg.prompt_field),
                                           ("answer_field", cfg.answer_field))
            if name not in have]
    if not lost:
        return ""
    import difflib

    parts = []
    for key, name in lost:
        close = difflib.get_close_matches(name, have, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        parts.append(f"data.{key} {name!r} is not a column{hint}")
    return f"; {'; '.join(parts)}. Its columns: {', '.join(have) or 'none'}"


def spec_from_cli(data: str, *, task: str | None = None, split: str | None = None) -> dict[str, Any]:
    """A command line's `--data X` as a data-section mapping: an existing file or directory,
    a task name with its own rows (countdown), or else a hub dataset id."""
    from tasks import TASKS, is_dotted

    if Path(data).exists():
        spec: dict[str, Any] = {"path": [data], "task": task or "math"}
    elif data in TASKS or is_dotted(data):
        spec = {"task": data}
    else:
        spec = {"hf_dataset": data, "task": task or "math"}
    return {**spec, **({"split": split} if split else {})}
