"""`rlrt experiment`: the toy-scale study. Every preset x every seed is one full `rlrt train`
run with an identical budget (same model, data, steps, batch, evaluation); the results table
holds held-out accuracy mean +- std over seeds, pass@k, the RLRT diagnostics, teacher tokens
scored and wall time, with plots."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from rlrt.launch import LocalRun
from rlrt.report import read_metrics
from rlrt.train import train

DIAGNOSTICS = ("self_driven_share", "mean_D_correct", "mean_abs_D_correct", "weight_mean",
               "clip_low_share", "clip_high_share", "clip_share", "entropy", "mismatch_kl",
               "clipfrac_low", "clipfrac_high")
BOOTSTRAP_RESAMPLES = 10_000


def _mean_metric(rows: list[dict], name: str) -> float | None:
    vals = [v for r in rows for k, v in r.items()
            if k.split("/")[-1] == name and isinstance(v, (int, float)) and v == v]
    return sum(vals) / len(vals) if vals else None


def _sum_metric(rows: list[dict], fragment: str) -> float:
    return float(sum(v for r in rows for k, v in r.items()
                     if fragment in k and isinstance(v, (int, float)) and v == v))


def _run_one(config: Path, preset: str, seed: int, out: Path, steps: int | None,
             console: Console, evals_before: dict | None = None) -> dict[str, Any]:
    run_dir = out / f"{preset}-s{seed}"
    overrides = {
        "RLRT_TRAINER__ALGORITHM__PRESET": preset,
        "RLRT_TRAINER__SEED": str(seed),
        "RLRT_RUN__SEED": "0",  # the same held-out set for every run
        "RLRT_RUN__DIR": str(run_dir),
        "RLRT_TRAINER__OUTPUT_DIR": str(run_dir / "trainer"),
        "RLRT_BUS__PREFIX": f"exp-{preset}-{seed}",
    }
    if steps:
        overrides["RLRT_TRAINER__TOTAL_STEPS"] = str(steps)
    saved = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    t0 = time.perf_counter()
    try:
        report = train(LocalRun(config, console=console), evals_before=evals_before)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    rows = read_metrics(run_dir / "trainer" / "metrics.jsonl")
    res = {"preset": preset, "seed": seed, "wall_s": time.perf_counter() - t0,
           "before": report.get("eval_before"), "after": report.get("eval_after"),
           "teacher_tokens_scored": _sum_metric(rows, "teacher_tokens_scored"),
           "steps": len(rows)}
    for d in DIAGNOSTICS:
        res[d] = _mean_metric(rows, d)
    (run_dir / "result.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def _fmt(xs: list[float], spec: str = ".3f") -> str:
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:{spec}}"
    return f"{statistics.mean(xs):{spec}} ± {statistics.stdev(xs):{spec}}"


def bootstrap_ci(xs: list[float], ys: list[float] | None = None, *, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of mean(xs) (or of mean(xs) - mean(ys), the two resampled
    independently: different presets' seeds are not paired) over seeds. None below 2 values."""
    import random

    if len(xs) < 2 or (ys is not None and len(ys) < 2):
        return None
    rng = random.Random(seed)
    stats = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        m = sum(rng.choice(xs) for _ in xs) / len(xs)
        if ys is not None:
            m -= sum(rng.choice(ys) for _ in ys) / len(ys)
        stats.append(m)
    stats.sort()
    lo = stats[int((1 - level) / 2 * len(stats))]
    hi = stats[min(len(stats) - 1, int((1 + level) / 2 * len(stats)))]
    return lo, hi


def _ci(xs: list[float], ys: list[float] | None = None) -> str:
    ci = bootstrap_ci(xs, ys)
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "n/a"


def _intervals(results: list[dict], presets: list[str], k: int) -> list[str]:
    """Gain and after-minus-grpo with 95% bootstrap intervals over seeds, and pass@1..k."""
    def after(p: str, key: str) -> list[float]:
        return [r["after"][key] for r in results
                if r["preset"] == p and r.get("after") and key in r["after"]]

    base = after("grpo", f"avg@{k}") if "grpo" in presets else []
    base_pass = after("grpo", f"pass@{k}") if "grpo" in presets else []
    ks = [x for x in range(1, k + 1) if any(f"pass@{x}" in (r.get("after") or {}) for r in results)]
    lines = ["", f"95% bootstrap intervals over seeds ({BOOTSTRAP_RESAMPLES:,} resamples):", "",
             f"| preset | gain avg@{k} | avg@{k} after − grpo | pass@{k} after − grpo | "
             + " | ".join(f"pass@{x}" for x in ks) + " |",
             "|---|---|---|---|" + "---|" * len(ks)]
    for p in presets:
        rs = [r for r in results if r["preset"] == p and r.get("after") and r.get("before")]
        gain = [r["after"][f"avg@{k}"] - r["before"][f"avg@{k}"] for r in rs]
        vs = _ci(after(p, f"avg@{k}"), base) if base and p != "grpo" else "—"
        vs_pass = _ci(after(p, f"pass@{k}"), base_pass) if base_pass and p != "grpo" else "—"
        passk = [_fmt(after(p, f"pass@{x}")) for x in ks]
        lines.append(f"| {p} | {_ci(gain)} | {vs} | {vs_pass} | " + " | ".join(passk) + " |")
    return lines


def summarize(results: list[dict], out: Path) -> str:
    presets = list(dict.fromkeys(r["preset"] for r in results))
    k = next((r["after"]["k"] for r in results if r.get("after")), None)
    lines = [f"| preset | seeds | held-out avg@{k} before | after | gain | pass@{k} after | "
             "self-driven share | mean D (correct) | mean abs D (correct) | weights at a clip "
             "bound | mean w | PPO clip fraction | teacher tokens scored | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in presets:
        rs = [r for r in results if r["preset"] == p and r.get("after") and r.get("before")]
        before = [r["before"][f"avg@{k}"] for r in rs]
        after = [r["after"][f"avg@{k}"] for r in rs]
        gain = [a - b for a, b in zip(after, before, strict=True)]
        passk = [r["after"][f"pass@{k}"] for r in rs]

        # Without teacher scores (grpo) the RLRT diagnostics are not defined: "—", not 0.
        scored = any(r.get("teacher_tokens_scored") for r in rs)

        def col(name: str, spec: str = ".3f", rs: list[dict] = rs, scored: bool = scored) -> str:
            vals = [r[name] for r in rs if r.get(name) is not None]
            return _fmt(vals, spec) if vals and scored else "—"

        clipfrac = [r["clipfrac_low"] + r["clipfrac_high"] for r in rs
                    if r.get("clipfrac_low") is not None and r.get("clipfrac_high") is not None]
        lines.append(f"| {p} | {len(rs)} | {_fmt(before)} | {_fmt(after)} | {_fmt(gain)} | "
                     f"{_fmt(passk)} | {col('self_driven_share')} | {col('mean_D_correct')} | "
                     f"{col('mean_abs_D_correct')} | {col('clip_share')} | "
                     f"{col('weight_mean')} | {_fmt(clipfrac)} | "
                     f"{_fmt([r['teacher_tokens_scored'] for r in rs], ',.0f')} | "
                     f"{_fmt([r['wall_s'] for r in rs], '.0f')} |")
    if k is not None:
        lines += _intervals(results, presets, k)
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _plot(results, presets, out)
    return table


def _plot(results: list[dict], presets: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for p in presets:
        curves = []
        for r in results:
            if r["preset"] != p:
                continue
            rows = read_metrics(out / f"{p}-s{r['seed']}" / "trainer" / "metrics.jsonl")
            ys = [row.get("reward_mean") for row in rows if isinstance(row.get("reward_mean"), (int, float))]
            if ys:
                curves.append(ys)
        if curves:
            n = min(len(c) for c in curves)
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
            axes[0].plot(range(n), mean, label=p)
    axes[0].set_title("training reward (mean over seeds)")
    axes[0].set_xlabel("step")
    axes[0].legend()
    k = next((r["after"]["k"] for r in results if r.get("after")), None)
    gains = {p: [r["after"][f"avg@{k}"] - r["before"][f"avg@{k}"] for r in results
                 if r["preset"] == p and r.get("after") and r.get("before")] for p in presets}
    axes[1].boxplot([gains[p] or [0.0] for p in presets], tick_labels=presets)
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[1].set_title(f"held-out avg@{k} gain per seed")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=110)
    plt.close(fig)


def run_experiment(config: Path, presets: list[str], seeds: list[int], out: Path,
                   steps: int | None = None, console: Console | None = None,
                   share_before: bool = True) -> str:
    """Every preset x seed, resumable (a run with a result.json is kept). `share_before`: every
    run starts from the same model and evaluates the same held-out prompts with the same
    sampling seed (`run.seed` is pinned to 0 above; only the trainer's seed varies), so the
    "before training" evaluation is one measurement: the first run takes it and the others
    reuse it (at 1,000 prompts x 8 samples it is minutes per run)."""
    console = console or Console(stderr=True)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    shared: dict | None = None
    for seed in seeds:  # seeds outermost: a partial study still compares every preset
        for preset in presets:
            run_dir = out / f"{preset}-s{seed}"
            if (run_dir / "result.json").exists():  # resumable: finished runs are kept
                results.append(json.loads((run_dir / "result.json").read_text()))
            else:
                console.rule(f"{preset}, seed {seed}")
                results.append(_run_one(config, preset, seed, out, steps, console,
                                        evals_before=shared if share_before else None))
                summarize(results, out)
            # the first finished run's measurement serves every later one
            if share_before and shared is None and (run_dir / "eval_before.json").exists():
                shared = json.loads((run_dir / "eval_before.json").read_text())
    return summarize(results, out)
