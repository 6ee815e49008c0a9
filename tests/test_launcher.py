"""`rlrt train` refuses bad set-ups with one clear line before anything starts."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, model: Path, **sections) -> Path:
    cfg = {
        "run": {"dir": str(tmp_path / "run"), "bootstrap": False, "eval_prompts": 0},
        "verifier": {"port": 0},
        "rollout": {"port": 0, "engine": {"kind": "cpu", "model_path": str(model)}},
        "teacher": {"port": 0, "engine": {"kind": "cpu", "model_path": str(model)}},
        "trainer": {"model_path": str(model), "output_dir": str(tmp_path / "run" / "trainer")},
    }
    for name, extra in sections.items():
        cfg.setdefault(name, {}).update(extra)
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _train(cfg: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlrt.cli", "train", "--config", str(cfg)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def _error_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines and lines[0].startswith("error:"), res.stderr
    return " ".join(lines)


@pytest.fixture
def stub_model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def test_unknown_preset_is_one_clear_error(tmp_path: Path, stub_model_dir: Path) -> None:
    cfg = _config(tmp_path, stub_model_dir, trainer={"algorithm": {"preset": "rlrt_turbo"}})
    msg = _error_line(_train(cfg))
    assert "rlrt_turbo" in msg and "trainer.algorithm" in msg


def test_missing_model_directory(tmp_path: Path) -> None:
    msg = _error_line(_train(_config(tmp_path, tmp_path / "nope")))
    assert "does not exist" in msg and "nope" in msg


def test_port_already_taken(tmp_path: Path, stub_model_dir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        msg = _error_line(_train(_config(tmp_path, stub_model_dir, rollout={"port": port})))
    assert f"port {port}" in msg and "rollout" in msg and "already taken" in msg


def test_unreachable_redis(tmp_path: Path, stub_model_dir: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    msg = _error_line(_train(_config(tmp_path, stub_model_dir, bus={"redis_url": f"redis://127.0.0.1:{port}/0"})))
    assert "unreachable" in msg
    assert not (tmp_path / "run" / "logs").exists()  # nothing was started


def test_trainer_child_does_not_inherit_a_callers_rendezvous(tmp_path: Path, stub_model_dir: Path,
                                                            monkeypatch) -> None:
    """A caller that ran torch.distributed itself (a notebook, a test session) has RANK,
    WORLD_SIZE and MASTER_PORT in its environment, and its store still holds that port: the
    trainer the launcher starts must pick its own."""
    from rlrt.launch import LocalRun

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    run = LocalRun(_config(tmp_path, stub_model_dir))
    run.ports = {"rollout": 1, "teacher": 2, "verifier": 3}
    env = run.make_plan().trainer_env(None)
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"} & set(env)
    assert env["RLRT_TRAINER__PUSH__CONTROL_TOKEN"] == run.token


def test_a_second_launcher_on_the_same_run_dir_is_refused(tmp_path: Path, stub_model_dir: Path) -> None:
    """Before any check or port: the run directory's holder is named (its pid), instead of
    "port taken, set 0", after which both runs wrote one folder."""
    cfg = _config(tmp_path, stub_model_dir)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from rlrt.train import "
         "lock_run_dir; lock_run_dir(Path(sys.argv[1])); print('held', flush=True); "
         "sys.stdin.read()", str(tmp_path / "run")],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # type: ignore[union-attr]
        msg = _error_line(_train(cfg))
    finally:
        holder.stdin.close()  # type: ignore[union-attr]
        holder.wait(30)
    assert f"another `rlrt train` (pid {holder.pid}) is running in {tmp_path / 'run'}" in msg
    assert not (tmp_path / "run" / "redis").exists()  # nothing of the run was touched
