"""When the evaluation sets run during training, what each evaluation is given, and what it
leaves behind (eval.jsonl, TensorBoard, the report). The services are replaced by a plain
function here; tests/test_byo_example.py runs the real ones."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from protocol.messages import SamplingParams
from rlrt.eval_runner import EvalRunner, steps_done
from rlrt.report import write_report
from rlrt.run_config import EvalSet
from tasks.data import DataConfig


class Recorder:
    """Stands in for the services: records each call, scores by the number of rows."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls: list[dict] = []
        self.gate = gate

    def __call__(self, rows, *, k, sampling, system_prompt, chat_template_kwargs,
                 chat_template=None) -> dict:
        if self.gate is not None:
            self.gate.wait(30)
        self.calls.append({"n": len(rows), "k": k, "sampling": sampling,
                           "system_prompt": system_prompt})
        return {"n_prompts": len(rows), "k": k, f"avg@{k}": len(rows) / 10, "pass@1": 0.1,
                f"pass@{k}": 0.5, "engine_version": 3}


def _runner(tmp_path: Path, sets: list[EvalSet], fn: Recorder) -> EvalRunner:
    data = DataConfig(task="countdown", system_prompt="Be exact.")
    return EvalRunner(sets, run_data=data, sampling=SamplingParams(temperature=0.9, max_new_tokens=20),
                      seed=0, evaluate=fn, out=tmp_path / "eval.jsonl", log=lambda m: None,
                      tb_dir=tmp_path / "tb")


def test_due_every_n_steps_never_at_the_end(tmp_path: Path) -> None:
    sets = [EvalSet(name="a", task="countdown", n=2, every=2),
            EvalSet(name="b", task="countdown", n=2, every=3), EvalSet(name="c", task="countdown", n=2)]
    r = _runner(tmp_path, sets, Recorder())
    assert [s.name for s in r.due(2, 6)] == ["a"]
    assert [s.name for s in r.due(3, 6)] == ["b"]
    assert r.due(6, 6) == []  # the final one is the "after training" evaluation
    assert r.due(0, 6) == [] and r.due(5, 6) == []


def test_set_gets_its_rows_sampling_and_rendering(tmp_path: Path) -> None:
    fn = Recorder()
    r = _runner(tmp_path, [EvalSet(name="h", task="countdown", n=5, k=3, top_p=0.8)], fn)
    res = r.run_all("before training", 0)
    (call,) = fn.calls
    assert (call["n"], call["k"], call["system_prompt"]) == (5, 3, "Be exact.")
    assert (call["sampling"].temperature, call["sampling"].top_p, call["sampling"].max_new_tokens) \
        == (0.9, 0.8, 20)  # unset knobs follow the trainer's sampling
    assert res["h"]["set"] == "h" and res["h"]["step"] == 0
    assert [json.loads(ln)["label"] for ln in (tmp_path / "eval.jsonl").read_text().splitlines()] \
        == ["before training"]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_a_slow_evaluation_is_skipped_not_queued(tmp_path: Path) -> None:
    gate = threading.Event()
    fn = Recorder(gate)
    r = _runner(tmp_path, [EvalSet(name="a", task="countdown", n=2, every=1)], fn)
    r.poll(1, 10)
    r.poll(1, 10)  # the same step again: nothing new
    r.poll(2, 10)  # the step-1 evaluation still runs: skipped
    gate.set()
    r.wait()
    assert [json.loads(ln)["step"] for ln in (tmp_path / "eval.jsonl").read_text().splitlines()] == [1]
    r.poll(3, 10)
    r.wait()
    assert len(fn.calls) == 2


def test_steps_done_reads_the_trainers_last_line(tmp_path: Path) -> None:
    m = tmp_path / "metrics.jsonl"
    assert steps_done(m) == 0
    m.write_text("".join(json.dumps({"step": i, "loss": 0.1}) + "\n" for i in range(4)) + '{"step": 4')
    assert steps_done(m) == 4  # a line being written is not a step done


def test_report_tabulates_and_plots_every_set(tmp_path: Path) -> None:
    fn = Recorder()
    r = _runner(tmp_path, [EvalSet(name="h", task="countdown", n=4, k=2, every=1)], fn)
    r.run_all("before training", 0)
    r.run_set(r.sets[0], "during", 1)
    r.run_all("after training", 2)
    (tmp_path / "trainer").mkdir()
    (tmp_path / "trainer" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": i, "reward_mean": 0.1 * i}) + "\n" for i in range(2)))

    class Cfg:
        output_dir = str(tmp_path / "trainer")

    md = write_report(tmp_path, Cfg(), {})
    text = md.read_text()
    assert "| h | step | avg@2 | pass@1 | pass@2 |" in text
    assert [ln.split("|")[2].strip() for ln in text.splitlines() if ln.startswith("| ")][1:] \
        == ["0", "1", "2"]
    assert (tmp_path / "eval.png").exists()
    assert [e["step"] for e in json.loads((tmp_path / "report.json").read_text())["evals"]["h"]] == [0, 1, 2]
