"""Preflight of what the user wrote, before any process of a run starts (seconds, one line per
problem, naming the fix):

- the data: the file exists, is not empty, has the named prompt and answer columns (else the
  columns it does have), and its first rows are usable;
- every evaluation set, the same way (its fields inherited from the run's data unless it sets
  its own: tasks/data.py `DataConfig.inherited`);
- the prompt rendering: a model without a chat template needs `data.chat_template` (raw prompts,
  or a named template), and the first row must render;
- the reward functions: imported and called on the first rows, in a child process with a
  deadline (user code never runs in the launcher; a function that hangs cannot hang it), each
  return checked the way the verifier checks it (tasks/rewards.py `as_reward`).

Without this, each of these mistakes surfaced minutes later: as skipped rows, as a verifier
dead-letter the trainer waited 15 minutes on, or as a traceback from deep inside a service.
"""

from __future__ import annotations

import difflib
import multiprocessing
import os
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tasks.base import RenderError, Row, render_row
from tasks.data import DataConfig, DataError, describe, load_table, missing_fields, usable_rows
from tasks.rewards import TASK, Spec, as_reward, load_fn, prompt_row

# Rows each check looks at: the first usable ones (enough to see a wrong field or a reward
# that fails on some rows, few enough for seconds).
PROBE_ROWS = 4
# Generator tasks make this many rows for the check (making num_prompts could take long).
PROBE_GENERATED = 16


class PreflightError(ValueError):
    """One thing the user wrote cannot work; the message names it and the fix."""


def first_rows(cfg: DataConfig, *, seed: int, what: str = "data", n: int = PROBE_ROWS) -> list[Row]:
    """The first `n` usable rows of `cfg`; PreflightError when the source is missing, empty,
    lacks the named columns (the message lists the columns it has) or has no usable row."""
    try:
        table = load_table(cfg, seed=seed, n=PROBE_GENERATED if cfg.kind == "generator" else None)
    except DataError as e:
        raise PreflightError(f"{what}: {e}") from None
    missing = missing_fields(table, cfg)
    if missing:
        raise PreflightError(f"{what} {describe(cfg)}{missing}")
    rows, skipped = usable_rows(table, cfg, n)
    if not rows:
        raise PreflightError(f"{what} {describe(cfg)}: no usable row (skipped {skipped}; "
                             "no_prompt: an empty or non-text prompt; no_answer: an empty answer; "
                             "bad_messages: a turn list that does not end with a user turn)")
    return rows


def check_rendering(tokenizer: Any, cfg: DataConfig, rows: Sequence[Row], what: str = "data") -> None:
    """The first row renders the way training will render it (chat template or raw)."""
    try:
        render_row(tokenizer, rows[0], system_prompt=cfg.system_prompt,
                   chat_template_kwargs=cfg.chat_template_kwargs, chat_template=cfg.chat_template)
    except RenderError as e:
        raise PreflightError(f"{what}: {e}") from None


# --------------------------------------------------------------------------- reward functions


def _probe_inputs(rows: Sequence[Row]) -> list[tuple[str, str, dict[str, Any]]]:
    """(response, reference, row) per probe: the reference solution (or answer) stands in for a
    model's response, so a function meets text shaped like a real answer."""
    from protocol.messages import PromptTask

    out = []
    for r in rows:
        task = PromptTask(run_id="preflight", prompt_id=r.prompt_id, prompt_text=r.prompt,
                          prompt_ids=[], answer=r.answer, solution=r.solution, task=r.task,
                          meta={"fields": dict(r.fields)} if r.fields else {})
        out.append((r.solution or r.answer, r.answer, prompt_row(task)))
    return out


def _where(e: BaseException) -> str:
    """'file:line' of the innermost frame of the user's code in a traceback."""
    frames = traceback.extract_tb(e.__traceback__)
    mine = os.path.dirname(os.path.abspath(__file__))
    user = [f for f in frames if not f.filename.startswith((mine, os.path.dirname(mine)))]
    f = (user or frames or [None])[-1]
    return f" ({os.path.relpath(f.filename)}:{f.lineno})" if f is not None else ""


def _missing_attr(fn: str) -> str:
    """For 'module:name' whose module has no `name`: the sentence saying so, with the closest
    name it does have (a typo such as `rewards:parital`)."""
    import importlib
    import importlib.util

    module, _, attr = fn.partition(":")
    try:
        if module.endswith(".py"):
            spec = importlib.util.spec_from_file_location("rlrt_preflight", os.path.abspath(module))
            assert spec is not None and spec.loader is not None
            mod: Any = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - only a hint: the caller names the failure anyway
        return "no such function"
    names = [n for n in dir(mod) if not n.startswith("_") and callable(getattr(mod, n))]
    close = difflib.get_close_matches(attr.split(".")[0], names, n=1)
    return (f"{module} has no function {attr!r}"
            + (f" (did you mean {close[0]!r}?)" if close else f"; it has {', '.join(names) or 'none'}"))


def probe_rewards(spec: Spec, probes: list[tuple[str, str, dict[str, Any]]]) -> list[str]:
    """Call every user function of `spec` on each probe (in this process: run it in a child,
    `check_rewards`). One line per failing function: what it did, on which row, where."""
    problems = []
    for fn, _ in spec[0]:
        if fn == TASK:
            continue
        try:
            f = load_fn(fn)
        except AttributeError:
            problems.append(f"reward function {fn}: {_missing_attr(fn)}")
            continue
        except Exception as e:  # noqa: BLE001 - the user's module failed to import
            problems.append(f"reward function {fn} cannot be imported: {type(e).__name__}: {e}"
                            f"{_where(e)}")
            continue
        for response, reference, row in probes:
            where = f"called on data row {row['prompt_id']!r}"
            try:
                value = f(response, reference, row)
            except Exception as e:  # noqa: BLE001 - any bug of the user's
                problems.append(f"reward function {fn} raised {type(e).__name__}: {e}"
                                f"{_where(e)} ({where})")
                break
            try:
                as_reward(value)  # the verifier's own check of a return value
            except (TypeError, ValueError) as e:
                problems.append(f"reward function {fn} {e} ({where}); return a float, "
                                "(float, bool) or {'reward': float, 'correct': bool}")
                break
    return problems


def _child(spec: Spec, probes: list, cwd: str, conn: Any) -> None:
    os.chdir(cwd)
    try:
        conn.send(probe_rewards(spec, probes))
    except BaseException as e:  # noqa: BLE001 - report anything, even a SystemExit
        conn.send([f"reward functions: the check itself failed: {type(e).__name__}: {e}"])


def check_rewards(spec: Spec | None, rows: Sequence[Row], *, timeout_s: float = 60.0) -> None:
    """Import and call the user's reward functions on `rows` in a spawned child process
    (`timeout_s` for it all: a function that hangs is reported, never waited on)."""
    if spec is None or all(fn == TASK for fn, _ in spec[0]):
        return
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(spec, _probe_inputs(rows), os.getcwd(), child),
                    daemon=True)
    p.start()
    child.close()
    try:
        if not parent.poll(timeout_s):
            raise PreflightError(
                f"reward functions did not return within {timeout_s:.0f} s on {len(rows)} rows "
                "(an endless loop, or a slow import?); the verifier would time each response out")
        problems = parent.recv()
    except EOFError:
        raise PreflightError("reward functions: the check process died (exit "
                             f"{p.exitcode}) while calling them (a crash in native code?)") from None
    finally:
        if p.is_alive():
            p.kill()
        p.join(5)
    if problems:
        raise PreflightError(problems[0] + (f" (and {len(problems) - 1} more)"
                                            if len(problems) > 1 else ""))


# --------------------------------------------------------------------------- the whole run


def check_run(data: DataConfig, eval_sets: Sequence[Any], *, seed: int, reward: Spec | None,
              model_dir: Path | None, log: Callable[[str], None] = print) -> None:
    """Everything above for a run: its data, each eval set (`rlrt.run_config.EvalSet`), the
    rendering with the model's tokenizer (when the model is there already) and the rewards.
    Raises PreflightError with the first problem."""
    rows = first_rows(data, seed=seed)
    sets = []
    for es in eval_sets:
        cfg = es.data_config(data)
        sets.append((es.name, cfg, first_rows(cfg, seed=seed + 7, what=f"eval set {es.name!r}")))
    if model_dir is not None and model_dir.is_dir():
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(model_dir))
        except (OSError, ValueError) as e:  # no tokenizer files, or none transformers can read
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PreflightError(f"model {model_dir}: its tokenizer cannot be loaded ({first}); "
                                 "the model directory needs tokenizer.json (or the files its "
                                 "tokenizer class reads) beside config.json") from None
        check_rendering(tok, data, rows)
        for name, cfg, erows in sets:
            check_rendering(tok, cfg, erows, what=f"eval set {name!r}")
    check_rewards(reward, rows)
    log(f"preflight: data {describe(data)} ok" + "".join(f", eval set {n!r} ok" for n, _, _ in sets)
        + (", reward functions ok" if reward else ""))
