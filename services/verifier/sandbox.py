"""The loop that runs inside each pool worker process (see pool.py for the parent side).

Protocol over one multiprocessing Connection:
  child -> parent  ("ready", pid)                        once, after limits are set
  parent -> child  [(seq, task, response, reference, timeout_s, reward, row, policy), ...]
                   a batch, or None = exit. `reward` is None (grade with the task's checker)
                   or a tasks.rewards.Spec (the run's reward plug-ins; `row` is their row);
                   `policy` is the math extraction policy (None = the default)
  child -> parent  (seq, correct, reward, status, parsed_response, parsed_reference, detail,
                   reward_error)  one per item, in batch order, as soon as each item is done;
                   reward_error is the traceback of a user reward function that failed, else None
  parent -> child  "yield"   (mid-batch) hand back the items not started yet
  child -> parent  ("yielded", n)   exactly once per "yield": after n items of the batch (the
                   rest is the parent's again), or n = 0 if the batch had already finished
  child -> parent  ("bye", reason)   before a planned exit (after a MemoryError, or after
                   max_items to shed leaks); the rest of the batch is re-queued

Two layers of deadline: here a SIGALRM timer (we are the process's main thread, so signals
work) interrupts pure-Python work and keeps the worker alive; the parent kills the whole
process if an item overruns its deadline plus a grace period (sympy stuck inside one C call
never returns to the interpreter, so the timer alone cannot stop it).
"""

from __future__ import annotations

import os
import resource
import signal
from multiprocessing.connection import Connection
from typing import Any

from services.verifier import core
from tasks import TASKS, get_task, rewards

# Result tuples are plain, so pickling is cheap and needs no pydantic on the parent's hot path.
Result = tuple[int, bool, float, str, "str | None", "str | None", str, "str | None"]


class SoftDeadline(BaseException):
    """Raised by the SIGALRM handler. A BaseException, like math-verify's own TimeoutException,
    so the many `except Exception` blocks inside sympy and math-verify do not swallow it."""


_armed = False


def _on_alarm(signum: int, frame: object) -> None:
    # Only raise while an item runs: an alarm landing between items must not kill the loop.
    if _armed:
        raise SoftDeadline()


def install_alarm() -> object:
    """Route SIGALRM to the soft deadline (main thread only). Returns the previous handler."""
    return signal.signal(signal.SIGALRM, _on_alarm)


def _vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _limit_memory(memory_mb: int) -> None:
    """Cap the address space at (what the worker uses now) + memory_mb. Items run one at a
    time, so this is the per-item cap; sympy then gets MemoryError instead of eating the host."""
    if memory_mb <= 0:
        return
    cap = _vm_bytes() + memory_mb * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    # A crash must not write a multi-GiB core file.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _failed(seq: int, status: str, detail: str, reward_error: str | None = None) -> Result:
    return (seq, False, 0.0, status, None, None, detail, reward_error)


def run_one(seq: int, task: str, response: str, reference: str, timeout_s: float,
            reward: rewards.Spec | None = None, row: dict[str, Any] | None = None,
            policy: str | None = None) -> tuple[Result, bool]:
    """Check one item under the soft deadline: with the task's checker (math answers taken
    under extraction `policy`), or with the reward plug-ins of `reward` (which may include that
    checker). Returns (result, worker_must_exit)."""
    global _armed
    _armed = True
    signal.setitimer(signal.ITIMER_REAL, max(timeout_s, 0.001))
    try:
        if reward is None:
            r = core.check(task, response, reference, policy)
        else:
            r = rewards.score(reward, response, reference, row or {},
                              lambda: core.check(task, response, reference, policy))
        _armed = False
        return (seq, r.correct, r.reward, r.status, r.parsed_response, r.parsed_reference, r.detail, None), False
    except SoftDeadline:
        return _failed(seq, "timeout", f"deadline of {timeout_s:g}s exceeded"), False
    except rewards.RewardFnError as e:
        # The user's code failed (not the response): the caller dead-letters the group with this.
        return _failed(seq, "error", f"reward function {e.fn} failed", e.text), e.memory
    except MemoryError:
        # The heap may be fragmented or half-freed: answer, then let the parent start a fresh worker.
        return _failed(seq, "error", "memory limit exceeded"), True
    except RecursionError:
        return _failed(seq, "error", "expression nested too deeply"), False
    except BaseException as e:  # noqa: BLE001 - includes math-verify's TimeoutException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return _failed(seq, "error", f"{type(e).__name__}: {str(e)[:200]}"), False
    finally:
        _armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)


def warm_up() -> None:
    """Import every task module and the run's reward functions and run one math check, so that
    the forkserver (which imports this module once) hands every forked worker compiled regexes,
    loaded grammars and imported modules: the first real item then costs what the hundredth
    does."""
    for name in TASKS:
        try:
            get_task(name)
        except Exception:  # a broken task module only fails its own items, later
            pass
    core.check(core.MATH, "\\boxed{\\frac{1}{2}}", "0.5")
    rewards.preload_from_env()  # the run's reward functions, imported outside any deadline


def main(conn: Connection, memory_mb: int, max_items: int) -> None:
    """Worker process entry point (a module-level function so forkserver/spawn can pickle it)."""
    # Ctrl-C in a terminal reaches the whole process group: let the parent decide when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    install_alarm()
    _limit_memory(memory_mb)
    conn.send(("ready", os.getpid()))
    done = 0
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return
        if batch is None:
            return
        if batch == "yield":  # asked for a batch that had already finished: nothing to give
            conn.send(("yielded", 0))
            continue
        for k, (seq, task, response, reference, timeout_s, reward, row, policy) in enumerate(batch):
            # Between items: the parent may want the rest back (another request is waiting;
            # it re-queues what we have not started). Only "yield" arrives mid-batch.
            if k and conn.poll():
                conn.recv()
                conn.send(("yielded", k))
                break
            try:
                result, must_exit = run_one(seq, task, response, reference, timeout_s, reward, row, policy)
            except SoftDeadline:
                # The alarm fired in the few instructions between finishing and disarming.
                result, must_exit = _failed(seq, "timeout", "deadline exceeded"), False
            conn.send(result)
            done += 1
            if must_exit or done >= max_items:
                # Say goodbye so the parent re-queues the rest of the batch instead of blaming
                # the next item for a crash, then start afresh.
                conn.send(("bye", "memory limit" if must_exit else "recycled"))
                return
