"""W&B logging (trainer.metrics.wandb) in offline mode: the real wandb library writes its run
file, which this test reads back record by record; a resumed run continues the same W&B run."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

# wandb is in the dev extra that scripts/setup.sh installs: a broken install fails here, it
# does not skip.
import wandb  # noqa: E402, F401 (imported only to fail loudly)
from support.polling import wait_until  # noqa: E402

from trainer.config import MetricsConfig  # noqa: E402
from trainer.metrics import MetricsSink  # noqa: E402

_BLOCK = 32 * 1024
_HEADER = 7  # ":W&B", magic 0xBEE1, version


def read_records(path: Path) -> list:
    """The protobuf Records of a .wandb file. The framing is LevelDB's log format (32 KiB
    blocks; each chunk: crc32 u32, length u16, type u8 = full/first/middle/last), as wandb's
    own datastore writes it."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, records, parts = _HEADER, [], []
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left  # zero-filled rest of a block
            continue
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # full, last
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            records.append(rec)
            parts = []
    return records


def complete_records(f: Path, timeout_s: float = 60.0) -> list:
    """The records of one offline run file once W&B's writer has finished it (its `exit`
    record is there): `run.finish()` can return before W&B's service process flushed the file."""

    def finished() -> list | None:
        recs = list(read_records(f))
        return recs if any(r.WhichOneof("record_type") == "exit" for r in recs) else None

    return wait_until(finished, timeout_s, f"{f}'s exit record", every_s=0.1)


def history(out: Path) -> tuple[set[str], list[dict]]:
    """(run ids, history rows) over every offline run file under <out>/wandb."""
    ids, rows = set(), []
    for f in sorted(out.glob("wandb/offline-run-*/run-*.wandb")):
        for r in complete_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                ids.add(r.run.run_id)
                config = {u.key: json.loads(u.value_json) for u in r.run.config.update}
                assert r.run.project == "rlrt-test" and r.run.display_name == "my-run"
                assert config["run_id"] == "my-run" and config["lr"] == 3e-6
            elif kind == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                             for i in r.history.item})
    return ids, rows


def sink(out: Path, start_step: int) -> MetricsSink:
    cfg = MetricsConfig(tensorboard=False, progress=False,
                        wandb={"project": "rlrt-test", "mode": "offline", "tags": ["t"]})
    return MetricsSink(out, cfg, total_steps=4, start_step=start_step)


def test_offline_run_logs_every_step_and_resumes_the_same_run(tmp_path: Path) -> None:
    (tmp_path / "trainer_config.json").write_text(json.dumps({"run_id": "my-run", "lr": 3e-6}))
    s = sink(tmp_path, 0)
    for step in range(2):
        s.log({"step": step, "version": step + 1, "loss": 0.5 - step / 10, "reward_mean": step / 4,
               "preset": "rlrt"})
    s.close()
    s = sink(tmp_path, 2)  # a resumed run
    for step in (2, 3):
        s.log({"step": step, "version": step + 1, "loss": 0.5 - step / 10, "reward_mean": step / 4})
    s.close()

    ids, rows = history(tmp_path)
    assert ids == {(tmp_path / "wandb-run-id").read_text().strip()}  # one W&B run across the resume
    by_step = {r["_step"]: r for r in rows}
    assert sorted(by_step) == [0, 1, 2, 3]
    for step, r in by_step.items():
        assert r["loss"] == pytest.approx(0.5 - step / 10) and r["reward_mean"] == pytest.approx(step / 4)
        assert "preset" not in r  # only numbers are logged
    # the JSONL log is unaffected by W&B
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


def test_off_by_default(tmp_path: Path) -> None:
    s = MetricsSink(tmp_path, MetricsConfig(tensorboard=False, progress=False), total_steps=1, start_step=0)
    s.log({"step": 0, "loss": 1.0})
    s.close()
    assert s.wandb is None and not (tmp_path / "wandb").exists()
