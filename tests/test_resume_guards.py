"""Resume guards (issue 26): one trainer per output folder, and a resume that would change
what the run trains is refused, naming each difference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.tiny_model import save_tiny_policy

from trainer.config import TrainerConfig
from trainer.fingerprint import HISTORY, ConfigChanged, check_resume, fingerprint, record_config
from trainer.output_lock import DirBusy, OutputLock

REPO = Path(__file__).resolve().parents[1]

_HOLDER = """
import sys, time
from trainer.output_lock import OutputLock
with OutputLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_trainer_on_one_output_folder_is_refused_with_the_holders_pid(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path / "out")], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DirBusy, match=rf"another trainer \(pid {holder.pid}\) is writing to "
                                          rf"{tmp_path / 'out'}: one run per output folder"):
            with OutputLock(tmp_path / "out", wait_s=0.2):
                pass
        holder.kill()  # however the holder dies, the kernel drops its lock
        holder.wait(10)
        with OutputLock(tmp_path / "out", wait_s=0):
            assert (tmp_path / "out" / "trainer.lock").read_text().strip() == str(os.getpid())
    finally:
        holder.kill()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_policy(tmp_path_factory.mktemp("models") / "a")


def _cfg(model, **kw) -> TrainerConfig:
    return TrainerConfig(model_path=str(model), **kw)


def test_a_changed_config_is_refused_naming_each_difference(model, tmp_path):
    a = model
    saved = {"step": 7, "fingerprint": fingerprint(_cfg(a, group_size=8,
                                                        algorithm={"preset": "rlrt"}))}
    now = _cfg(a, group_size=4, algorithm={"preset": "grpo"})
    with pytest.raises(ConfigChanged) as e:
        check_resume(now, saved)
    msg = str(e.value)
    assert msg.startswith("the config differs from the one checkpoint step 7 was trained with: ")
    assert "group_size: 8 -> 4" in msg and "algorithm.preset: 'rlrt' -> 'grpo'" in msg
    assert "--allow-config-change" in msg and "\n" not in msg
    # the same config, or a path to the same files, passes; an explicit override passes
    assert check_resume(_cfg(a, group_size=8, algorithm={"preset": "rlrt"}), saved) == []
    assert "group_size: 8 -> 4" in check_resume(now, saved, allow_change=True)
    assert check_resume(now, {"step": 3}) == []  # a checkpoint from before fingerprints


def test_another_model_of_the_same_shape_is_a_difference(model, tmp_path):
    a = model
    other = tmp_path / "other"
    other.mkdir()
    for f in Path(a).iterdir():
        data = f.read_bytes()
        if f.suffix == ".safetensors":  # same header (shapes), other values
            data = data[:-8] + bytes(8)
        (other / f.name).write_bytes(data)
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in Path(a).iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    saved = {"step": 2, "fingerprint": fingerprint(_cfg(a))}
    assert check_resume(_cfg(moved), saved) == []  # the same files elsewhere
    with pytest.raises(ConfigChanged, match=rf"model: {a} \(digest \w+\) -> {other} \(digest"):
        check_resume(_cfg(other), saved)


def test_the_history_records_what_each_stretch_of_steps_ran(model, tmp_path):
    a = model
    first = _cfg(a, output_dir=str(tmp_path / "out"), group_size=8)
    record_config(first, 0, fingerprint(first))
    later = _cfg(a, output_dir=str(tmp_path / "out"), group_size=4)
    record_config(later, 6, fingerprint(later), ["group_size: 8 -> 4"])
    again = _cfg(a, output_dir=str(tmp_path / "out"), group_size=2)
    record_config(again, 4, fingerprint(again))  # --resume-from 4: the line from 6 is redone
    lines = [json.loads(x) for x in (tmp_path / "out" / HISTORY).read_text().splitlines()]
    assert [(x["from_step"], x["fingerprint"]["group_size"]) for x in lines] == [(0, 8), (4, 2)]
    saved = json.loads((tmp_path / "out" / "trainer_config.json").read_text())
    assert saved["group_size"] == 2
