"""`rlrt experiment`'s results table: mean ± std over seeds per preset, and RLRT diagnostics
shown only where a teacher scored tokens (grpo has none: "—", never a misleading 0)."""

from __future__ import annotations

import json
from pathlib import Path

from rlrt.experiment import summarize


def _result(preset: str, seed: int, after: float, scored: int, share: float | None) -> dict:
    return {"preset": preset, "seed": seed, "wall_s": 90.0 + seed,
            "before": {"k": 4, "avg@4": 0.2, "pass@4": 0.4},
            "after": {"k": 4, "avg@4": after, "pass@4": 0.5},
            "teacher_tokens_scored": scored, "steps": 3, "self_driven_share": share,
            "mean_D_correct": 0.05 if scored else 0.0, "weight_mean": 1.0 if scored else 0.0}


def test_table_has_mean_and_std_per_preset_and_no_fake_diagnostics(tmp_path: Path) -> None:
    results = [_result("grpo", s, a, 0, 0.0) for s, a in enumerate([0.30, 0.32, 0.34])]
    results += [_result("rlrt", s, a, 1000 + s, 0.4) for s, a in enumerate([0.31, 0.33, 0.35])]
    for r in results:  # a reward curve per run, as a real run leaves
        d = tmp_path / f"{r['preset']}-s{r['seed']}" / "trainer"
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("\n".join(json.dumps({"step": i, "reward_mean": 0.1 * i})
                                                   for i in range(3)) + "\n")
    table = summarize(results, tmp_path)
    main, _, rest = table.partition("\n\n")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in main.splitlines()[2:]}
    assert rows["grpo"][0] == "3"
    assert rows["grpo"][2] == "0.320 ± 0.020"  # after: mean ± sample std over seeds
    assert rows["grpo"][3] == "0.120 ± 0.020"  # gain
    assert rows["grpo"][5:10] == ["—"] * 5  # no teacher: diagnostics undefined
    assert rows["rlrt"][5] == "0.400 ± 0.000" and rows["rlrt"][11] == "1,001 ± 1"
    # the 95% bootstrap intervals over seeds: of the gain, and of the difference to grpo
    ci = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
          for line in rest.splitlines() if line.startswith("| ") and "preset" not in line}
    lo, hi = (float(x) for x in ci["grpo"][0].strip("[]").split(","))
    assert 0.10 <= lo < 0.12 < hi <= 0.14
    lo, hi = (float(x) for x in ci["rlrt"][1].strip("[]").split(","))
    assert lo < 0.01 < hi and ci["grpo"][1] == "—"
    # pass@k after minus grpo's (the paper's pass@k claim): every run here has pass@4 0.5
    assert ci["rlrt"][2] == "[+0.000, +0.000]" and ci["grpo"][2] == "—"
    assert (tmp_path / "results.png").stat().st_size > 1000
    assert json.loads((tmp_path / "results.json").read_text()) == results
