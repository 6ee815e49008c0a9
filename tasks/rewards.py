"""Reward plug-ins: the `reward:` section of a run's config, and how a response's reward is
computed from it.

A reward function is any importable callable

    def score(response: str, reference: str, row: dict) -> float | tuple[float, bool] | dict

returning the reward, optionally with a `correct` flag: `(reward, correct)`, or
`{"reward": r, "correct": c}`, or an object with `.reward` / `.correct` (a CheckResult). `row`
is the prompt's dataset row (see `prompt_row`). Several functions are combined by weights:

    reward:
      fns:
        - {fn: task, weight: 1.0}                      # the prompt's own checker (math-verify)
        - {fn: "mypkg.rewards:format_bonus", weight: 0.1}
      correct_threshold: 1.0

The verifier runs the functions inside its sandboxed pool worker (same deadline, memory cap and
kill as math-verify), so nothing here may assume it runs in the service's process. A function
that raises (or returns something that is not a number) fails the whole group: the verifier
dead-letters it with the traceback and keeps going.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from protocol.config import RLRTSettings
from tasks.base import CheckResult

# The name of the built-in term: the prompt's task checker (math-verify for "math", the task
# module's exact checker otherwise), so a user function can be added to it instead of replacing it.
TASK = "task"

# What travels to a pool worker with each item: ((fn, weight), ...), correct_by, threshold.
# Plain tuples: pickled per IPC batch, and comparable/hashable for the worker's cache.
Spec = tuple[tuple[tuple[str, float], ...], str, float]


def _check_path(v: str) -> str:
    if v == TASK:
        return v
    module, sep, attr = v.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{v!r} is not 'module.path:function' (or 'file.py:function', or 'task')")
    return v


class RewardFn(BaseModel):
    """One term of the reward: a function and its weight."""

    model_config = ConfigDict(extra="forbid")

    fn: str = Field(
        description="'module.path:function' (imported from PYTHONPATH or the directory rlrt runs "
        "in), 'path/to/file.py:function', or 'task' = the prompt's own checker (math-verify for maths)"
    )
    weight: float = Field(1.0, description="multiplies this term's reward in the sum")

    _path = field_validator("fn")(_check_path)


class RewardSettings(RLRTSettings):
    """Section `reward` (env `RLRT_REWARD__*`). Unset: the prompt's task checker alone, reward
    1/0 and `correct` = reward 1, as before plug-ins existed."""

    section: ClassVar[str] = "reward"
    model_config = SettingsConfigDict(env_prefix="RLRT_REWARD__")

    fn: str | None = Field(
        None, description="shorthand for one function of weight 1: fns: [{fn: <this>}]"
    )
    fns: list[RewardFn] = Field(
        default_factory=list, description="terms summed with their weights into the reward"
    )
    correct_by: Literal["flags", "threshold"] = Field(
        "flags",
        description="what makes a rollout 'correct' (RLRT's teacher gate, accuracy, avg@k): "
        "flags = every term that returns a correct flag says so ('task' always does), and, "
        "where no term returns one, reward >= correct_threshold; threshold = always "
        "reward >= correct_threshold",
    )
    correct_threshold: float = Field(
        1.0, description="a rollout whose summed reward reaches this is correct (see correct_by)"
    )

    _fn_path = field_validator("fn")(lambda v: v if v is None else _check_path(v))

    @model_validator(mode="after")
    def _one_form(self) -> RewardSettings:
        if self.fn is not None and self.fns:
            raise ValueError("set either reward.fn or reward.fns, not both")
        return self

    @property
    def enabled(self) -> bool:
        """False = no plug-in: the verifier grades with the task checker exactly as before."""
        return bool(self.fn or self.fns)

    def spec(self) -> Spec | None:
        """The plain form sent with each item to a pool worker; None when not enabled."""
        if not self.enabled:
            return None
        terms = [RewardFn(fn=self.fn)] if self.fn else self.fns
        return tuple((t.fn, float(t.weight)) for t in terms), self.correct_by, float(self.correct_threshold)


def prompt_row(prompt: Any) -> dict[str, Any]:
    """The `row` a reward function receives for a PromptTask: the dataset row's own columns
    (what the producer put in `meta["fields"]`, if anything), then the prompt's `prompt_id`,
    `prompt`, `answer`, `solution` and `task`, and `meta` (the producer's bookkeeping, e.g.
    the trainer's row index and epoch)."""
    meta = dict(prompt.meta or {})
    fields = meta.pop("fields", None)
    out: dict[str, Any] = dict(fields) if isinstance(fields, Mapping) else {}
    out.update(prompt_id=prompt.prompt_id, prompt=prompt.prompt_text, answer=prompt.answer,
               solution=prompt.solution, task=prompt.task, meta=meta)
    return out


class RewardFnError(Exception):
    """A user's reward function failed. `text` is the traceback (what the dead letter shows)."""

    def __init__(self, fn: str, text: str, *, memory: bool = False) -> None:
        super().__init__(f"reward function {fn} failed:\n{text}")
        self.fn = fn
        self.text = text
        self.memory = memory  # a MemoryError: the worker's heap is suspect, replace it


_LOADED: dict[str, Callable[..., Any]] = {}
# The verifier names the run's functions here before its pool starts; the pool's forkserver
# imports them once (services/verifier/sandbox.py `warm_up`), so no worker pays a slow import
# inside a response's deadline.
PRELOAD_ENV = "RLRT_REWARD_PRELOAD"


def preload_names(spec: Spec) -> str:
    """The value of PRELOAD_ENV for `spec`: its functions, one per line."""
    return "\n".join(fn for fn, _ in spec[0] if fn != TASK)


def preload_from_env() -> None:
    """Import the functions PRELOAD_ENV names. A failure is left for the items to report (with
    the traceback, through the dead letter): here nobody would see it."""
    for fn in filter(None, os.environ.get(PRELOAD_ENV, "").splitlines()):
        try:
            load_fn(fn)
        except Exception:
            pass


def _with_cwd_on_path() -> None:
    # As `python -m` does: the directory a user runs rlrt in is where their package is.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())


def locate(spec: Spec) -> None:
    """Check that every function's module can be found, without running it (the service
    process never executes user code; the pool workers do). Raises ValueError naming the
    missing one: a typo fails at start-up, not as a dead-lettered group per prompt."""
    _with_cwd_on_path()
    for fn, _ in spec[0]:
        if fn == TASK:
            continue
        module = fn.partition(":")[0]
        if module.endswith(".py"):
            if not os.path.isfile(module):
                raise ValueError(f"reward function {fn}: file {os.path.abspath(module)} not found")
            continue
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError) as e:
            found, why = None, f" ({e})"
        else:
            why = ""
        if found is None:
            raise ValueError(f"reward function {fn}: module {module!r} not found{why} "
                             f"(searched PYTHONPATH and {os.getcwd()})")


def load_fn(path: str) -> Callable[..., Any]:
    """Import 'module.path:function' or 'file.py:function' (relative paths from the working
    directory, which is also on the search path for dotted modules). Cached per process."""
    if path in _LOADED:
        return _LOADED[path]
    module_name, _, attr = path.partition(":")
    if module_name.endswith(".py"):
        file = os.path.abspath(module_name)
        spec = importlib.util.spec_from_file_location("rlrt_reward_" + re.sub(r"\W", "_", file), file)
        if spec is None or spec.loader is None or not os.path.isfile(file):
            raise FileNotFoundError(f"reward file {file} not found")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        _with_cwd_on_path()
        module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{path} is {type(obj).__name__}, not a function")
    _LOADED[path] = obj
    return obj


def as_reward(value: Any) -> tuple[float, bool | None]:
    """(reward, correct or None) from whatever a reward function returned; ValueError/TypeError
    when it is not a finite number (a bool counts as 0/1)."""
    correct: Any = None
    if isinstance(value, Mapping):
        if "reward" not in value:
            raise ValueError(f"returned a mapping without 'reward': keys {sorted(value)[:10]}")
        reward, correct = value["reward"], value.get("correct")
    elif isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError(f"returned a tuple of {len(value)} items; expected (reward, correct)")
        reward, correct = value
    elif hasattr(value, "reward") and not isinstance(value, (int, float)):
        reward, correct = value.reward, getattr(value, "correct", None)
    else:
        reward = value
    if isinstance(reward, (str, bytes)):
        raise TypeError(f"returned a reward of type {type(reward).__name__}, not a number")
    if not isinstance(reward, (int, float)):
        try:
            reward = float(reward)  # numpy / torch scalars
        except (TypeError, ValueError):
            raise TypeError(f"returned a reward of type {type(reward).__name__}, not a number") from None
    reward = float(reward)
    if not math.isfinite(reward):
        raise ValueError(f"returned a non-finite reward {reward}")
    if correct is not None and not isinstance(correct, bool):
        if type(correct).__name__ in ("bool_", "bool") or correct in (0, 1):
            correct = bool(correct)  # numpy.bool_, 0/1
        else:
            raise TypeError(f"returned correct={correct!r}; expected a bool")
    return reward, correct


def _call(fn: str, response: str, reference: str, row: dict[str, Any]) -> tuple[float, bool | None]:
    try:
        return as_reward(load_fn(fn)(response, reference, row))
    except Exception as e:  # BaseExceptions (the pool's deadline) pass through untouched
        # The traceback from the user's code on (this frame dropped): what they need to fix it.
        tb = traceback.format_exception(type(e), e, e.__traceback__.tb_next)
        raise RewardFnError(fn, "".join(tb)[-3500:], memory=isinstance(e, MemoryError)) from e


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def score(spec: Spec, response: str, reference: str, row: dict[str, Any],
          task_check: Callable[[], CheckResult]) -> CheckResult:
    """Reward of one response under `spec`. `task_check` grades with the prompt's own checker
    (called only when the spec has a 'task' term). Raises RewardFnError when a user function
    fails; may run long (the pool worker's deadline applies)."""
    terms, correct_by, threshold = spec
    total = 0.0
    flags: list[bool] = []
    parts: list[str] = []
    base: CheckResult | None = None
    for fn, weight in terms:
        if fn == TASK:
            base = task_check()
            r, c = base.reward, base.correct
        else:
            r, c = _call(fn, response, reference, row)
        total += weight * r
        if c is not None:
            flags.append(c)
        parts.append(f"{fn}={_fmt(r)}" + ("" if c is None else f" ({'correct' if c else 'wrong'})"))
    if correct_by == "flags" and flags:
        correct = all(flags)
    else:
        correct = total >= threshold
    detail = "; ".join(parts)
    if base is not None and base.detail:
        detail += f" | task: {base.detail}"
    return CheckResult(
        correct=correct, reward=total,
        # A task checker's timeout or parse error stays visible; user terms are "ok" once they return.
        status=base.status if base is not None else "ok",
        parsed_response=base.parsed_response if base is not None else None,
        parsed_reference=base.parsed_reference if base is not None else None,
        detail=detail,
    )
