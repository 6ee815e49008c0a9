"""How cost grows with the work of a step: RL steps/min and peak memory (the summed RSS of every
process of a run) of `rlrt train` and TRL's `GRPOTrainer` side by side, as one knob of the
step's shape moves and the others stay at bench/e2e.py's (8 prompts, G = 8, 32 tokens):

    prompts per step   8 -> 128
    G                  4 -> 16
    completion cap     32 -> 256 tokens

Same model, prompts, sampling and update on both sides as bench/e2e.py (whose runners this
reuses; TRL with torch's default thread count, its faster setting in bench/e2e.py). For each knob, the fitted exponent
b of seconds per step ~ work^b (least squares in log-log; b = 1: cost grows as the work,
b < 1: fixed costs amortise). Writes a table and docs/scaling.png; the headline JSON is the
geometric mean over all points of ours' steps/min over TRL's.

    python bench/scaling.py [--steps 6 --trl-steps 4 --skip 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from e2e import SHAPE, Shape, build_model, run_ours, run_trl  # noqa: E402

NAME = "scaling"
AXES = {
    "prompts per step": ("p", [8, 32, 128]),
    "G": ("g", [4, 8, 16]),
    "completion cap": ("max_new", [32, 128, 256]),
}
QUICK = {"prompts per step": [8, 32], "G": [4, 8], "completion cap": [32, 64]}


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y on log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    var = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / var if var else 0.0


def plot(points: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(points), figsize=(4.2 * len(points), 6.4), squeeze=False)
    for col, (axis, pts) in enumerate(points.items()):
        xs = [p["x"] for p in pts]
        for side, style in (("ours", "-o"), ("trl", "--s")):
            axes[0][col].plot(xs, [60 / p[side]["s_per_step"] for p in pts], style, label=side)
            axes[1][col].plot(xs, [p[side]["peak_rss_mb"] for p in pts], style, label=side)
        for row, ylabel in ((0, "RL steps/min"), (1, "peak RSS, all processes (MB)")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(axis)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
    fig.suptitle("cost against the work of a step (others at 8 prompts, G 8, 32 tokens)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="ours: steps per point")
    ap.add_argument("--trl-steps", type=int, default=4, help="TRL: steps per point")
    ap.add_argument("--skip", type=int, default=1, help="steps counted as start-up")
    ap.add_argument("--quick", action="store_true", help="two small points per axis")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    from _report import emit, record

    points: dict[str, list[dict]] = {}
    load = {"start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="rlrt-bench-scaling-") as d:
        tmp = Path(d)
        model_dir = tmp / "model"
        build_model(model_dir)
        for axis, (field, values) in AXES.items():
            values = QUICK[axis] if args.quick else values
            for x in values:
                shape = Shape(**{**SHAPE.__dict__, field: x})
                ours = run_ours(tmp, model_dir, args.steps, args.skip, shape)
                trl = run_trl(tmp, model_dir, args.trl_steps, args.skip, threads=0, shape=shape)
                points.setdefault(axis, []).append({"x": x, "shape": str(shape), "ours": ours,
                                                    "trl": trl})
                print(f"{axis} {x}: ours {ours['s_per_step']:.2f} s/step "
                      f"{ours['peak_rss_mb']:.0f} MB, TRL {trl['s_per_step']:.2f} s/step "
                      f"{trl['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    load["end"] = os.getloadavg()[0]
    rows, ratios = [], []
    for axis, pts in points.items():
        xs = [p["x"] for p in pts]
        b = {side: slope(xs, [p[side]["s_per_step"] for p in pts]) for side in ("ours", "trl")}
        m = {side: slope(xs, [p[side]["peak_rss_mb"] for p in pts]) for side in ("ours", "trl")}
        for p in pts:
            o, t = p["ours"], p["trl"]
            ratios.append(t["s_per_step"] / o["s_per_step"])
            rows.append(f"| {axis} | {p['x']} | {60 / o['s_per_step']:.1f} | "
                        f"{60 / t['s_per_step']:.1f} | {t['s_per_step'] / o['s_per_step']:.2f}x | "
                        f"{o['peak_rss_mb']:.0f} | {t['peak_rss_mb']:.0f} | "
                        f"{o['timeline']['busy_per_core']:.0%} |")
        rows.append(f"| {axis}: fitted exponent of s/step (peak RSS) | | {b['ours']:.2f} "
                    f"({m['ours']:.2f}) | {b['trl']:.2f} ({m['trl']:.2f}) | | | | |")
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    first = points[next(iter(points))][0]["ours"]
    per_proc = ", ".join(f"`{k}` {v:.0f}" for k, v in first["peak_rss_mb_by_process"].items())
    png = ROOT / "docs" / "scaling.png"
    if not args.no_record:
        plot(points, png)
    body = f"""
Seconds per RL step and peak memory against the work of a step, one knob at a time (the others
at 8 prompts, G 8, 32-token cap), `rlrt train` (tiny config, preset grpo, as bench/e2e.py) and
TRL `GRPOTrainer` (torch's default threads, {os.cpu_count()} here: its faster setting in
bench/e2e.py); {args.steps} steps per point for ours, {args.trl_steps} for
TRL, the first {args.skip + 1} counted as start-up. Peak RSS = the largest sum over time of
the resident memory of every process of the run (ours: launcher, Redis, services, trainer;
TRL: its one process), sampled every 0.2 s. Busy per core: the step timeline's share of the
{os.cpu_count()}-core limit. Load average {load['start']:.1f} at the start, {load['end']:.1f}
at the end. Plot: `docs/scaling.png`.

| knob | value | ours steps/min | TRL steps/min | ours/TRL | ours peak RSS (MB) | TRL peak RSS (MB) | ours busy per core |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Geometric mean of ours/TRL over the points: **{geo:.2f}x**. The exponent b: s/step grows as
work^b; b near 1 means the cost is the work itself, b below 1 that a fixed per-step cost is
being amortised. Peak RSS per process of ours at the first point (8 prompts, G 8, 32 tokens;
the README's main job's processes) (MB): {per_proc}.
"""
    if not args.no_record:
        record(NAME, body)
    else:
        print(body, file=sys.stderr)
    print(json.dumps({"points": {a: [{"x": p["x"], "ours_s": p["ours"]["s_per_step"],
                                      "trl_s": p["trl"]["s_per_step"]} for p in pts]
                                 for a, pts in points.items()}}), file=sys.stderr)
    emit(NAME, geo, 1.0, "x TRL steps/min (geometric mean over the points)")


if __name__ == "__main__":
    main()
