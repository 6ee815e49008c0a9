"""The run's evaluation sets (top-level `eval:`, rlrt/run_config.py) against the running
rollout and verifier services: before training, every `every` trainer steps while it trains
(in a background thread, so supervision goes on), and after.

Each result is a line of `<run dir>/eval.jsonl`:
`{"set", "label", "step", "avg@k", "pass@1", ..., "engine_version"}` (step = trainer steps done
when it started; the weights evaluated are those the rollout service serves then, named by
`engine_version`). rlrt/report.py plots and tabulates them; with `tb_dir` they are also
TensorBoard scalars `eval/<set>/<metric>` beside the trainer's.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protocol.messages import SamplingParams
from rlrt.run_config import EvalSet
from tasks.base import Row
from tasks.data import DataConfig, load_rows

# Rows of a generator task's set when the set gives no `n`.
GENERATED_DEFAULT_N = 200


class EvalRunner:
    def __init__(self, sets: list[EvalSet], *, run_data: DataConfig, sampling: SamplingParams,
                 seed: int, evaluate: Callable[..., dict[str, Any]],
                 out: Path, log: Callable[[str], None] = print,
                 tb_dir: Path | None = None) -> None:
        """`evaluate(rows, k=, sampling=, system_prompt=, chat_template_kwargs=, chat_template=)`
        runs one evaluation through the services (rlrt.evaluate.evaluate, bound to a run's bus)."""
        self.sets = sets
        self.run_data = run_data
        self.sampling = sampling
        self.seed = seed
        self._evaluate = evaluate
        self.out = out
        self.log = log
        self._rows: dict[str, tuple[DataConfig, list[Row]]] = {}
        self._thread: threading.Thread | None = None
        self._done_steps: set[int] = set()
        self.errors: list[str] = []
        self.tb_dir = tb_dir
        self._tb: Any = None

    def rows(self, es: EvalSet) -> tuple[DataConfig, list[Row]]:
        if es.name not in self._rows:
            cfg = es.data_config(self.run_data)
            n = es.n or (GENERATED_DEFAULT_N if cfg.kind == "generator" else None)
            # A fixed seed apart from training's, so the set is the same whatever the run seed.
            self._rows[es.name] = (cfg, load_rows(cfg, seed=self.seed + 7, n=n))
        return self._rows[es.name]

    def sampling_of(self, es: EvalSet) -> SamplingParams:
        s = self.sampling
        return SamplingParams(
            temperature=s.temperature if es.temperature is None else es.temperature,
            top_p=s.top_p if es.top_p is None else es.top_p,
            max_new_tokens=es.max_new_tokens or s.max_new_tokens)

    def record(self, results: dict[str, dict], note: str) -> None:
        """Log results measured elsewhere (`rlrt experiment` shares one before-training
        evaluation between runs of the same model) as if this run had measured them, marked."""
        for res in results.values():
            res = {**res, "reused": note}
            with open(self.out, "a") as f:
                f.write(json.dumps(res) + "\n")
            self._to_tensorboard(res)

    def run_set(self, es: EvalSet, label: str, step: int) -> dict[str, Any]:
        cfg, rows = self.rows(es)
        res = self._evaluate(rows, k=es.k, sampling=self.sampling_of(es),
                             system_prompt=cfg.system_prompt,
                             chat_template_kwargs=cfg.chat_template_kwargs,
                             chat_template=cfg.chat_template)
        res = {"set": es.name, "label": label, "step": step, **res}
        with open(self.out, "a") as f:
            f.write(json.dumps(res) + "\n")
        self._to_tensorboard(res)
        self.log(f"eval {es.name} ({label}, step {step}): avg@{es.k} {res[f'avg@{es.k}']:.3f}  "
                 f"pass@{es.k} {res[f'pass@{es.k}']:.3f}")
        return res

    def run_all(self, label: str, step: int, sets: list[EvalSet] | None = None) -> dict[str, dict]:
        return {es.name: self.run_set(es, label, step) for es in (self.sets if sets is None else sets)}

    def _to_tensorboard(self, res: dict[str, Any]) -> None:
        if self.tb_dir is None:
            return
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.tb_dir))
        for key, v in res.items():
            if key.startswith(("avg@", "pass@")) or key == "mean_response_tokens":
                self._tb.add_scalar(f"eval/{res['set']}/{key}", float(v), int(res["step"]))
        self._tb.flush()

    # ------------------------------------------------------------------ during training
    def due(self, steps_done: int, total_steps: int) -> list[EvalSet]:
        """Sets due after `steps_done` steps (the last step's evaluation is the 'after' one)."""
        if steps_done <= 0 or steps_done >= total_steps or steps_done in self._done_steps:
            return []
        return [es for es in self.sets if es.every and steps_done % es.every == 0]

    def poll(self, steps_done: int, total_steps: int) -> None:
        """Start the evaluations due at `steps_done` in the background, unless one is still
        running (then this point is skipped and said so: evaluation never blocks training)."""
        sets = self.due(steps_done, total_steps)
        if not sets:
            return
        self._done_steps.add(steps_done)
        if self._thread is not None and self._thread.is_alive():
            self.log(f"eval at step {steps_done} skipped: the previous one is still running")
            return

        def work() -> None:
            try:
                self.run_all("during", steps_done, sets)
            except Exception as e:  # noqa: BLE001 - reported, and the run goes on
                self.errors.append(f"step {steps_done}: {type(e).__name__}: {e}")
                self.log(f"eval at step {steps_done} failed: {type(e).__name__}: {e}")

        self._thread = threading.Thread(target=work, name="eval", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()


def steps_done(metrics_jsonl: Path) -> int:
    """Trainer steps completed, from the last line of its metrics.jsonl (0 before the first)."""
    try:
        with open(metrics_jsonl, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 65536))
            lines = f.read().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"]) + 1
        except (ValueError, KeyError):
            continue
    return 0
