"""The update's thread count, adapted to what the services are doing (`trainer.idle_threads`).

On one machine (the laptop path: `rlrt train` runs the rollout, verifier, teacher and trainer
side by side) the cores are shared. With `max_staleness >= 1` the rollout samples step t+1's
groups while the trainer updates on step t; it finishes part way through the update and then
has nothing to do until the next push. A trainer fixed at one thread leaves that core idle; one
fixed at two fights the sampler for it (OpenMP threads spin at every barrier while the other
process holds the core: no faster than one thread). So the trainer runs the update at
`torch_threads` while anything upstream is still working and switches to `idle_threads` the
moment every admitted group has arrived in its inbox: the rollout, the verifier and the teacher
then have nothing to do until the next push, which comes after the update.

Two threads, two roles: the event loop learns that the pipeline drained (`set_drained`, from
the inbox's handler); the thread that runs the update applies the count (`apply`) at safe points
-- before each decoder block's forward and before its backward (module and tensor hooks), before
each micro-batch and before the optimizer step -- because torch's intra-op thread count belongs
to the thread that calls `torch.set_num_threads` (OpenMP's per-thread setting), not to the
process.

The thread count changes how fast the kernels run, not what they compute, up to the float
rounding of a reduction split differently; `trainer.deterministic` turns switching off.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from torch import nn

from protocol.trace import tracer


class ThreadSwitch:
    """`busy` threads while the services work, `idle` threads once they have drained."""

    def __init__(self, busy: int, idle: int) -> None:
        self.busy, self.idle = busy, idle
        self.want = busy  # written by the event loop, read by the update thread (an int: atomic)
        self.active = False  # only the update switches (not a canary forward, not a gather)
        self._since: float | None = None  # when the update took `idle` threads
        self.idle_s = 0.0  # seconds of the current update run at `idle` threads (a metric)

    def set_drained(self, drained: bool) -> None:
        self.want = self.idle if drained else self.busy

    def apply(self) -> None:
        """On the update's own thread: take the wanted thread count if it changed."""
        if not self.active:
            return
        want = self.want
        if torch.get_num_threads() == want:
            return
        torch.set_num_threads(want)
        if want == self.idle:
            self._since = time.time()
        else:
            self._close()

    def _close(self) -> None:
        if self._since is None:
            return
        now = time.time()
        self.idle_s += now - self._since
        t = tracer("trainer")
        if t is not None:  # the timeline counts these seconds as `idle` cores busy
            t.record(f"threads:{self.idle}", self._since, now)
        self._since = None

    @contextlib.contextmanager
    def update(self) -> Iterator[None]:
        """Around one update, on its thread: switching on, then back to `busy` threads."""
        self.active, self.idle_s = True, 0.0
        try:
            self.apply()
            yield
        finally:
            self._close()
            self.active = False
            torch.set_num_threads(self.busy)

    def attach(self, model: nn.Module) -> None:
        """Hooks that call `apply` before each block's forward and before its backward."""
        for block in _blocks(model):
            block.register_forward_pre_hook(lambda *_: self.apply())
            block.register_forward_hook(self._hook_backward)

    def _hook_backward(self, _module: nn.Module, _inputs: object, output: object) -> None:
        out = output[0] if isinstance(output, tuple) else output
        if self.active and isinstance(out, torch.Tensor) and out.requires_grad:
            # Runs when this block's output gradient is ready: just before its backward.
            out.register_hook(lambda _grad: self.apply())


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks: the longest ModuleList in the model (`model.layers` of Llama / Qwen,
    `transformer.h` of GPT-2), or the model itself when it has none."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return [model]
    return list(max(lists, key=len))
