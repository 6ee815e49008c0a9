"""The step timeline: where the time of a step goes, per process (issue 24).

Reads the spans every process of a run wrote (protocol/trace.py, `<run.dir>/trace/*.jsonl`),
takes a window of the trainer's last steps, and reports for each process the share of the
window it was busy (the union of its spans: a service handles several messages at once), and
for the whole run the busy processes per core -- how close the run came to the machine's
limit. `render` draws the window as a PNG: one row per process, one colour per kind of work,
gaps are idle.

    rlrt timeline RUN_DIR [--steps 10]      (also written by `rlrt train` into the report)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

# (row, kind) -> what the bar means. A service's one kind is handling a message of its stage.
LABELS = {
    ("rollout", "handle"): "sampling (rollout)",
    ("verifier", "handle"): "verification",
    ("teacher", "handle"): "teacher scoring",
    ("rollout", "load"): "rollout: loading pushed weights",
    ("teacher", "load"): "teacher: loading pushed weights",
    ("trainer", "wait"): "trainer: waiting for groups / the push to load",
    ("trainer", "update"): "trainer: update (fwd/bwd/optimizer)",
    ("trainer", "push"): "trainer: weight push",
    ("trainer", "checkpoint"): "trainer: checkpoint",
}
# Not work of its own: the trainer's bus consumer only files a group into its inbox.
SKIP = {("trainer", "handle")}
ROWS = ("rollout", "verifier", "teacher", "trainer")
# Drawn, but not busy: the trainer waiting on the services.
IDLE = {"wait"}


@dataclass
class Timeline:
    """The spans of a window, by row, and what they add up to."""

    start: float
    end: float
    steps: int
    spans: dict[str, list[tuple[str, float, float]]] = field(default_factory=dict)
    busy: dict[str, float] = field(default_factory=dict)  # row -> busy share of the window
    # Cores a row used beyond one, in shares of the window: the trainer's update on
    # `idle_threads` (spans "threads:N", trainer/threads.py) keeps N cores busy, not one.
    extra: float = 0.0
    trainer_kinds: dict[str, float] = field(default_factory=dict)  # kind -> share of the window
    cores: int = 1

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def busy_per_core(self) -> float:
        """The busy rows' shares summed (plus the extra cores of a multi-threaded update), per
        core: 1.0 would mean every core busy all the time."""
        return (sum(self.busy.values()) + self.extra) / self.cores

    def summary(self) -> dict:
        return {"window_s": round(self.seconds, 2), "steps": self.steps, "cores": self.cores,
                "busy_share": {k: round(v, 3) for k, v in self.busy.items()},
                "trainer_share": {k: round(v, 3) for k, v in self.trainer_kinds.items()},
                "extra_cores": round(self.extra, 3), "busy_per_core": round(self.busy_per_core, 3)}


def read_spans(trace_dir: str | os.PathLike) -> dict[str, list[tuple[str, float, float]]]:
    """Every span of the run, by row (the file name up to its pid: a restarted process keeps
    its row); a line cut by a kill is skipped."""
    rows: dict[str, list[tuple[str, float, float]]] = {}
    for path in sorted(Path(trace_dir).glob("*.jsonl")):
        row = path.stem.rsplit("-", 1)[0]
        for line in path.read_text().splitlines():
            try:
                d = json.loads(line)
                span = (str(d["kind"]), float(d["t0"]), float(d["t1"]))
            except (ValueError, KeyError, TypeError):
                continue
            if (row, span[0]) not in SKIP:
                rows.setdefault(row, []).append(span)
    for spans in rows.values():
        spans.sort(key=lambda s: s[1])
    return rows


def union_seconds(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Length of the union of `intervals` clipped to [start, end]."""
    total, cur_a, cur_b = 0.0, None, None
    for a, b in sorted((max(a, start), min(b, end)) for a, b in intervals):
        if b <= a:
            continue
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                total += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_b is not None:
        total += cur_b - cur_a
    return total


def window(trace_dir: str | os.PathLike, steps: int = 10, cores: int | None = None
           ) -> Timeline | None:
    """The last `steps` trainer steps (from the start of the first one's wait to the end of
    the last one's update, push or checkpoint); None when the run traced no step."""
    rows = read_spans(trace_dir)
    waits = [s for s in rows.get("trainer", []) if s[0] == "wait"]
    if not waits:
        return None
    first = waits[max(0, len(waits) - steps)]
    start = first[1]
    end = max(s[2] for s in rows["trainer"] if s[1] >= start)
    tl = Timeline(start=start, end=end, steps=len(waits) - waits.index(first),
                  cores=cores or os.cpu_count() or 1)
    for row, spans in rows.items():
        inside = [s for s in spans if s[2] > start and s[1] < end]
        tl.spans[row] = inside
        work = [(a, b) for k, a, b in inside if k not in IDLE]
        tl.busy[row] = union_seconds(work, start, end) / tl.seconds
        for k in {k for k, _, _ in inside if k.startswith("threads:")}:
            ivs = [(a, b) for kk, a, b in inside if kk == k]
            tl.extra += (int(k.split(":")[1]) - 1) * union_seconds(ivs, start, end) / tl.seconds
    for kind in ("wait", "update", "push", "checkpoint"):
        ivs = [(a, b) for k, a, b in tl.spans.get("trainer", []) if k == kind]
        tl.trainer_kinds[kind] = union_seconds(ivs, start, end) / tl.seconds
    return tl


def _label(rk: tuple[str, str]) -> str:
    if rk[1].startswith("threads:"):
        return f"{rk[0]}: update on {rk[1].split(':')[1]} threads (the services idle)"
    return LABELS.get(rk, f"{rk[0]}: {rk[1]}")


def render(tl: Timeline, out: str | os.PathLike, title: str = "") -> Path:
    """The window as a PNG: a row per process, a colour per kind of work, gaps idle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in ROWS if r in tl.spans] + sorted(r for r in tl.spans if r not in ROWS)
    colours = plt.get_cmap("tab10")
    kinds = sorted({(r, k) for r in rows for k, _, _ in tl.spans[r]})
    colour = {rk: colours(i % 10) for i, rk in enumerate(kinds)}
    fig, ax = plt.subplots(figsize=(12, 0.7 * len(rows) + 1.4))
    for y, row in enumerate(reversed(rows)):
        for rk in kinds:
            if rk[0] != row:
                continue
            bars = [(a - tl.start, b - a) for k, a, b in tl.spans[row] if k == rk[1]]
            # Overlapping spans (messages handled concurrently) draw darker, not wider.
            ax.broken_barh(bars, (y - 0.35, 0.7), facecolors=colour[rk], alpha=0.55,
                           label=_label(rk))
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{r} ({tl.busy[r]:.0%} busy)" for r in reversed(rows)])
    ax.set_xlim(0, tl.seconds)
    ax.set_xlabel("seconds (gaps: idle)")
    ax.set_title(title or f"last {tl.steps} steps: {tl.seconds:.1f} s, busy per core "
                 f"{tl.busy_per_core:.2f} ({tl.cores} cores)", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    seen = dict(zip(labels, handles, strict=True))
    ax.legend(seen.values(), seen.keys(), fontsize=7, loc="upper center",
              bbox_to_anchor=(0.5, -0.2), ncol=4)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
