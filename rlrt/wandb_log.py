"""What the trainer's W&B run cannot log itself, logged by `rlrt train` once the trainer has
exited: the whole resolved config of the run (every section, not only the trainer's) and the
evaluation results (avg@k, pass@k of every set, before, during and after training).

It reopens the trainer's W&B run (same id, from <output_dir>/wandb-run-id; one process at a
time, so the run's files are never written twice at once). Evaluation metrics have their own
x axis, `eval/step` (the trainer steps done when the evaluation started): W&B's own step only
increases, and the evaluations arrive after the training steps they belong to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trainer.metrics import start_wandb, wandb_target


def eval_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The W&B scalars of one evaluation result (a line of eval.jsonl)."""
    name = result.get("set", "eval")
    out = {f"eval/{name}/{k}": float(v) for k, v in result.items()
           if (k.startswith(("avg@", "pass@")) or k in ("reward_mean", "mean_response_tokens"))
           and isinstance(v, (int, float))}
    out["eval/step"] = float(result.get("step", 0))
    return out


def log_run(trainer_cfg: Any, results: Sequence[Mapping[str, Any]],
            config: Mapping[str, Any] | None = None) -> bool:
    """Log `results` (eval.jsonl's lines, in order) and `config` (the resolved run config,
    secrets already out of it) to the run's W&B run. False when W&B is off for this run."""
    wcfg = trainer_cfg.metrics.wandb
    if not wandb_target(wcfg)[0]:
        return False
    out = Path(trainer_cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = start_wandb(out, wcfg, config={})
    try:
        if config:
            run.config.update(dict(config), allow_val_change=True)
        run.define_metric("eval/step")
        run.define_metric("eval/*", step_metric="eval/step")
        for res in results:
            run.log(eval_metrics(res))
        last: dict[str, Mapping[str, Any]] = {}
        for res in results:
            last[str(res.get("set"))] = res
        for res in last.values():  # the summary holds each set's final evaluation
            for k, v in eval_metrics(res).items():
                if k != "eval/step":
                    run.summary[k] = v
    finally:
        run.finish()
    return True
