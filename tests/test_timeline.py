"""The step timeline (protocol/trace.py -> rlrt/timeline.py): spans written by real processes'
code paths (the bus consumer, the tracer) are read back, the busy shares are the union of
the spans, and the PNG is drawn."""

from __future__ import annotations

import asyncio
import json

import pytest
from PIL import Image

from protocol import trace
from protocol.bus import Bus
from protocol.config import BusSettings
from protocol.messages import PromptTask
from rlrt.timeline import render, union_seconds, window


@pytest.fixture
def trace_dir(tmp_path, monkeypatch):
    d = tmp_path / "trace"
    monkeypatch.setenv(trace.ENV, str(d))
    trace._tracers.clear()  # tracers are cached per process: start from this directory
    yield d
    trace._tracers.clear()


def write(d, row: str, spans: list[tuple[str, float, float]], pid: int = 1) -> None:
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{row}-{pid}.jsonl", "a") as f:
        for kind, a, b in spans:
            f.write(json.dumps({"kind": kind, "t0": a, "t1": b}) + "\n")


def test_union_counts_overlaps_once_and_clips_to_the_window():
    assert union_seconds([(0, 2), (1, 3), (5, 6)], 0, 10) == 4
    assert union_seconds([(0, 2), (1, 3), (5, 6)], 2.5, 5.5) == pytest.approx(1.0)
    assert union_seconds([], 0, 1) == 0


def test_the_window_is_the_last_steps_and_shares_add_up(trace_dir, tmp_path):
    # 4 steps of 10 s: wait 0-4, update 4-9, push 9-10; the rollout samples during each wait
    # with two messages at once (overlapping), the teacher 1 s per step.
    trainer, rollout, teacher = [], [], []
    for i in range(4):
        t = 10.0 * i
        trainer += [("wait", t, t + 4), ("update", t + 4, t + 9), ("push", t + 9, t + 10),
                    ("handle", t + 3, t + 3.1)]  # filing a group: not work of its own
        rollout += [("handle", t, t + 2), ("handle", t + 1, t + 3)]
        teacher += [("handle", t + 3, t + 4)]
    write(trace_dir, "trainer", trainer)
    write(trace_dir, "rollout", rollout[:4])
    write(trace_dir, "rollout", rollout[4:], pid=2)  # restarted: same row
    write(trace_dir, "teacher", teacher)
    with open(trace_dir / "teacher-1.jsonl", "a") as f:
        f.write('{"kind": "handle", "t0": 1')  # a line cut by a kill is skipped

    tl = window(trace_dir, steps=2, cores=2)
    assert tl is not None and tl.steps == 2
    assert (tl.start, tl.end) == (20.0, 40.0)
    assert tl.busy["rollout"] == pytest.approx(6 / 20)  # 3 s of union per step
    assert tl.busy["teacher"] == pytest.approx(2 / 20)
    assert tl.busy["trainer"] == pytest.approx(0.6)  # waiting is not busy
    assert tl.trainer_kinds == pytest.approx({"wait": 0.4, "update": 0.5, "push": 0.1,
                                              "checkpoint": 0.0})
    assert tl.busy_per_core == pytest.approx((0.3 + 0.1 + 0.6) / 2)
    png = render(tl, tmp_path / "timeline.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 500


def test_nothing_is_recorded_when_tracing_is_off(tmp_path, monkeypatch):
    monkeypatch.delenv(trace.ENV, raising=False)
    trace._tracers.clear()
    with trace.span("rollout", "handle"):
        pass
    assert trace.tracer("rollout") is None
    assert window(tmp_path) is None  # no spans: no timeline


def test_the_bus_records_a_span_per_message_handled(trace_dir, redis_url, prefix):
    async def main() -> None:
        bus = Bus.from_url(None, BusSettings(redis_url=redis_url, prefix=prefix))
        stream = bus.cfg.stream("prompts")
        for i in range(3):
            await bus.publish(stream, PromptTask(run_id="r", msg_id=f"m{i}", prompt_id="p",
                                                 prompt_text="x", prompt_ids=[1, 2], answer="1"))
        stop = asyncio.Event()
        seen = []

        async def handler(m: PromptTask) -> None:
            seen.append(m.msg_id)
            if len(seen) == 3:
                stop.set()

        await bus.consume(stream, "rollout", "c0", handler, PromptTask, stop)
        await bus.close()

    asyncio.run(main())
    lines = [json.loads(x) for p in trace_dir.glob("rollout-*.jsonl")
             for x in p.read_text().splitlines()]
    assert len(lines) == 3 and all(x["kind"] == "handle" and x["t1"] >= x["t0"] for x in lines)


def test_an_update_on_more_threads_counts_its_extra_cores(trace_dir, tmp_path):
    # 2 steps of 10 s: update 0-8, the last 2 s of it on 2 threads (the services idle).
    trainer = []
    for i in range(2):
        t = 10.0 * i
        trainer += [("wait", t, t + 1), ("update", t + 1, t + 9), ("threads:2", t + 7, t + 9),
                    ("push", t + 9, t + 10)]
    write(trace_dir, "trainer", trainer)
    tl = window(trace_dir, steps=2, cores=2)
    assert tl.busy["trainer"] == pytest.approx(0.9)  # the threads span adds no busy time
    assert tl.extra == pytest.approx(0.2)  # but a second core for 2 s of each 10
    assert tl.busy_per_core == pytest.approx((0.9 + 0.2) / 2)
    assert tl.summary()["extra_cores"] == pytest.approx(0.2)
    render(tl, tmp_path / "timeline.png")
