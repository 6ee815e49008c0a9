"""The end-of-run report: PNG plots of the training curves and of the evaluation sets, and a
short markdown summary with each set's avg@k / pass@k before, during and after training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

# Panels of the main figure: (title, metric names in the trainer's metrics.jsonl, whether the
# panel is about the teacher's re-weighting: shown only for presets that score with a teacher,
# where a GRPO run would plot them flat at their neutral values).
PANELS = [
    ("reward (mean over the step's groups)", ("reward_mean",), False),
    ("accuracy (share of correct responses)", ("accuracy",), False),
    ("RLRT: share of self-driven tokens (s > q, D < 0) on correct rollouts", ("self_driven_share",), True),
    ("RLRT: mean D = q - s (paper's sign)", ("mean_D_correct", "mean_D"), True),
    ("RLRT: mean token weight w_t", ("weight_mean",), True),
    ("RLRT: share of weights at the clip bounds", ("clip_low_share", "clip_high_share"), True),
    ("PPO clip fractions", ("clipfrac_low", "clipfrac_high"), False),
    ("response length (tokens)", ("response_len_mean", "response_len_max"), False),
    ("entropy", ("entropy",), False),
    ("train/engine mismatch KL", ("mismatch_kl",), False),
]


def uses_teacher(trainer_cfg: Any) -> bool:
    """Whether the run's preset scores with a teacher (trainer/algorithm/config.py); True when
    the config does not say (an old report's), so nothing is hidden that might apply."""
    return bool(getattr(getattr(trainer_cfg, "algorithm", None), "uses_teacher", True))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, r in enumerate(rows):
        v = r.get(key)
        if isinstance(v, (int, float)) and v == v:  # skip NaN
            xs.append(r.get("step", i))
            ys.append(float(v))
    return xs, ys


def pick(keys: list[str], names: tuple[str, ...]) -> list[str]:
    """The panel's metrics that this run logged (a metric may sit under a 'group/' prefix)."""
    return [k for n in names for k in keys if k == n or k.endswith("/" + n)]


def plot_curves(rows: list[dict], out: Path, title: str = "", *,
                teacher: bool = True) -> Path | None:
    """The training curves, one panel per PANELS entry this run logged (the teacher panels
    only when `teacher`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float))})
    panels = [(t, pick(keys, names)) for t, names, of_teacher in PANELS
              if teacher or not of_teacher]
    panels = [(t, ks) for t, ks in panels if ks]
    if not panels:
        return None
    cols = 2
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(11, 3.2 * nrows), squeeze=False)
    for ax, (t, ks) in zip(axes.flat, panels, strict=False):
        for k in ks:
            xs, ys = _series(rows, k)
            ax.plot(xs, ys, label=k, lw=1.4)
        ax.set_title(t, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def eval_table(name: str, results: list[dict[str, Any]]) -> list[str]:
    """Markdown rows of one evaluation set: avg@k, pass@1 and pass@k at every evaluated step."""
    k = results[0].get("k")
    keys = [key for key in (f"avg@{k}", "pass@1", f"pass@{k}", "mean_response_tokens")
            if key in results[0]]
    lines = [f"| {name} | step | " + " | ".join(keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for r in results:
        vals = " | ".join(f"{r[key]:.3f}" if key in r else "" for key in keys)
        lines.append(f"| {r.get('label', '')} | {r.get('step', '')} | {vals} |")
    return lines


def plot_evals(by_set: dict[str, list[dict[str, Any]]], out: Path) -> Path | None:
    """avg@k and pass@k of every evaluation set against trainer steps (before = step 0)."""
    if not any(len(v) >= 2 for v in by_set.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for name, results in by_set.items():
        k = results[0].get("k")
        for key, style in ((f"avg@{k}", "-o"), (f"pass@{k}", "--s")):
            pts = [(r["step"], r[key]) for r in results if key in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=f"{name} {key}", lw=1.4, ms=3)
    ax.set_xlabel("step")
    ax.set_title("evaluation sets", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(run_dir: Path, trainer_cfg: Any, report: dict[str, Any],
                 console: Console | None = None) -> Path:
    out_dir = Path(trainer_cfg.output_dir)
    rows = read_metrics(out_dir / "metrics.jsonl")
    preset = getattr(getattr(trainer_cfg, "algorithm", None), "preset", "?")
    png = plot_curves(rows, run_dir / "training.png", title=f"{preset}: {len(rows)} steps",
                      teacher=uses_teacher(trainer_cfg))
    # Every evaluation of the run (before, during, after; a resumed run's too), by set.
    by_set: dict[str, list[dict[str, Any]]] = {}
    for r in read_metrics(run_dir / "eval.jsonl"):
        by_set.setdefault(str(r.get("set")), []).append(r)
    for results in by_set.values():
        results.sort(key=lambda r: (r.get("step", 0), r.get("label") == "after training"))
    eval_png = plot_evals(by_set, run_dir / "eval.png")
    timeline = _timeline(run_dir)
    if timeline is not None:
        report["timeline"] = timeline
    report["steps"] = len(rows)
    report["preset"] = preset
    report["evals"] = by_set
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    lines = [f"# Run report: {preset}", "", f"- steps trained: {len(rows)}",
             f"- training wall time: {report.get('train_seconds', 0):.0f} s",
             f"- metrics: `{out_dir / 'metrics.jsonl'}`; plots: `{png}`"
             + (f", `{eval_png}`" if eval_png else ""), *timeline_lines(timeline), ""]
    for name, results in by_set.items():
        lines += [*eval_table(name, results), ""]
    md = run_dir / "report.md"
    md.write_text("\n".join(lines) + "\n")
    if console is not None:
        console.print(f"report: {md}" + (f", plots: {png}" if png else ""))
    _to_wandb(run_dir, trainer_cfg, console)
    return md


def _timeline(run_dir: Path) -> dict[str, Any] | None:
    """timeline.png of the run's last steps and its figures (rlrt/timeline.py), when the
    processes traced (run.trace)."""
    from rlrt.timeline import render, window

    tl = window(run_dir / "trace")
    if tl is None:
        return None
    render(tl, run_dir / "timeline.png")
    return {**tl.summary(), "png": str(run_dir / "timeline.png")}


def timeline_lines(timeline: dict[str, Any] | None) -> list[str]:
    """The report's lines on where the time of the last steps went."""
    if not timeline:
        return []
    busy = ", ".join(f"{k} {v:.0%}" for k, v in timeline["busy_share"].items())
    trainer = ", ".join(f"{k} {v:.0%}" for k, v in timeline["trainer_share"].items() if v)
    return [f"- timeline of the last {timeline['steps']} steps ({timeline['window_s']} s): "
            f"busy {busy}; the trainer's time: {trainer}; busy processes per core "
            f"{timeline['busy_per_core']:.2f} ({timeline['cores']} cores): `{timeline['png']}`"]


def _to_wandb(run_dir: Path, trainer_cfg: Any, console: Console | None) -> None:
    """The evaluations and the whole resolved config into the trainer's W&B run, when it has
    one (rlrt/wandb_log.py). A failure here is said, never fatal: the report is written."""
    if not hasattr(trainer_cfg, "metrics"):
        return
    import yaml

    from protocol.config import RESOLVED_NAME
    from rlrt.wandb_log import log_run

    resolved = run_dir / RESOLVED_NAME
    try:
        config = yaml.safe_load(resolved.read_text()) if resolved.is_file() else None
        if log_run(trainer_cfg, read_metrics(run_dir / "eval.jsonl"), config) and console:
            console.print("W&B: evaluations and the resolved config logged")
    except Exception as e:  # noqa: BLE001 - W&B trouble must not lose the report
        if console is not None:
            console.print(f"[yellow]W&B: could not log the evaluations: {e}[/]")
