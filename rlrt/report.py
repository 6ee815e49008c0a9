"""The end-of-run report: PNG plots of the training curves and a short markdown summary with
held-out accuracy before and after."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

# Panels of the main figure: (title, metric names, in the trainer's metrics.jsonl).
PANELS = [
    ("reward (mean over the step's groups)", ("reward_mean",)),
    ("accuracy (share of correct responses)", ("accuracy",)),
    ("RLRT: share of self-driven tokens (D > 0) on correct rollouts", ("self_driven_share",)),
    ("RLRT: mean D = s - q", ("mean_D_correct", "mean_D")),
    ("RLRT: mean token weight w_t", ("weight_mean",)),
    ("RLRT: share of weights at the clip bounds", ("clip_low_share", "clip_high_share")),
    ("PPO clip fractions", ("clipfrac_low", "clipfrac_high")),
    ("response length (tokens)", ("response_len_mean", "response_len_max")),
    ("entropy", ("entropy",)),
    ("train/engine mismatch KL", ("mismatch_kl",)),
]


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


def plot_curves(rows: list[dict], out: Path, title: str = "") -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float))})
    panels = [(t, pick(keys, names)) for t, names in PANELS]
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


def write_report(run_dir: Path, trainer_cfg: Any, report: dict[str, Any],
                 console: Console | None = None) -> Path:
    out_dir = Path(trainer_cfg.output_dir)
    rows = read_metrics(out_dir / "metrics.jsonl")
    preset = getattr(getattr(trainer_cfg, "algorithm", None), "preset", "?")
    png = plot_curves(rows, run_dir / "training.png", title=f"{preset}: {len(rows)} steps")
    report["steps"] = len(rows)
    report["preset"] = preset
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    before, after = report.get("eval_before") or {}, report.get("eval_after") or {}
    lines = [f"# Run report: {preset}", "", f"- steps trained: {len(rows)}",
             f"- training wall time: {report.get('train_seconds', 0):.0f} s",
             f"- metrics: `{out_dir / 'metrics.jsonl'}`; plots: `{png}`", ""]
    if before and after:
        k = before.get("k")
        lines += ["| held-out | before | after |", "|---|---|---|"]
        for key in (f"avg@{k}", f"pass@{k}", "pass@1", "mean_response_tokens"):
            if key in before and key in after:
                lines.append(f"| {key} | {before[key]:.3f} | {after[key]:.3f} |")
    md = run_dir / "report.md"
    md.write_text("\n".join(lines) + "\n")
    if console is not None:
        console.print(f"report: {md}" + (f", plots: {png}" if png else ""))
    return md
