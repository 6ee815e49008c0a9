"""Bring your own model and data, config side: the shared `model` / `data` / `eval` keys, --set
overrides and their precedence, hub resolution of models and datasets against an HF cache laid
out here (no network), and the launcher's model rules (no bootstrap in place of a user's
model, no HF_HUB_OFFLINE forced on children)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from support.tokenizer import char_tokenizer
from typer.testing import CliRunner

from protocol.config import ConfigError
from protocol.config import resolve as resolve_config
from rlrt.cli import app
from rlrt.config import RunConfig, load_section
from rlrt.run_config import EvalSet, RunSettings, eval_sets
from tasks.data import DataConfig, DataError, load_rows
from tasks.hub import HubError, resolve

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch) -> Path:
    """An HF hub cache as huggingface_hub lays it out, offline (as on this machine)."""
    import huggingface_hub.constants as c

    root = tmp_path / "hf-cache"
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return root


def _lay_out(cache: Path, kind: str, repo: str, files: dict[str, str]) -> Path:
    folder = cache / f"{kind}s--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / COMMIT
    for name, text in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_text(text)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    return snap


# --------------------------------------------------------------------------- the model key


def test_one_model_key_reaches_trainer_and_both_engines(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "c.yaml", {"model": "org/policy", "teacher": {"engine": {"kind": "cpu"}}})
    assert load_section("trainer", str(cfg)).model_path == "org/policy"
    assert load_section("rollout", str(cfg)).engine.model_path == "org/policy"
    assert load_section("teacher", str(cfg)).engine.model_path == "org/policy"


def test_a_section_of_its_own_wins_over_the_model_key(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "c.yaml", {"model": "org/policy",
                                       "teacher": {"engine": {"model_path": "org/teacher"}}})
    assert load_section("teacher", str(cfg)).engine.model_path == "org/teacher"
    assert load_section("rollout", str(cfg)).engine.model_path == "org/policy"


def test_data_key_reaches_the_trainer(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "c.yaml", {"model": "m", "data": {"path": "x.jsonl",
                                                              "prompt_field": "question"}})
    data = load_section("trainer", str(cfg)).data
    assert data.path == ["x.jsonl"] and data.prompt_field == "question"
    assert data.task == "math" and data.kind == "files"  # files default to maths


# --------------------------------------------------------------------------- --set


def test_set_beats_env_and_yaml(tmp_path: Path, monkeypatch) -> None:
    cfg = _write(tmp_path / "c.yaml", {"model": "m", "trainer": {"lr": 1e-4, "algorithm": {"lam": 0.2}}})
    monkeypatch.setenv("RLRT_TRAINER__LR", "3e-4")
    assert load_section("trainer", str(cfg)).lr == 3e-4  # env beats YAML
    t = load_section("trainer", str(cfg), ["trainer.lr=1e-5", "trainer.algorithm.eps_w=0.5"])
    assert t.lr == 1e-5  # --set beats env
    assert t.algorithm.eps_w == 0.5 and t.algorithm.lam == 0.2  # nested: the rest is kept


def test_set_model_and_data(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "c.yaml", {"model": "yaml/model"})
    sets = ["model=cli/model", "data.path=q.jsonl"]
    assert load_section("rollout", str(cfg), sets).engine.model_path == "cli/model"
    assert load_section("trainer", str(cfg), sets).data.path == ["q.jsonl"]


@pytest.mark.parametrize("item, words", [
    ("trainer.lr", "KEY.PATH=VALUE"),
    ("nonsense.x=1", "unknown key 'nonsense'"),
    ("trainer.lr=[1", "not valid YAML"),
])
def test_bad_set_is_one_clear_error(item: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace(".", r"\.")):
        resolve_config(None, [item])


def test_set_with_a_wrong_type_names_the_field(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "c.yaml", {"model": "m"})
    with pytest.raises(ConfigError, match="trainer.lr"):
        load_section("trainer", str(cfg), ["trainer.lr=fast"])


def test_config_show_displays_the_overrides(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "c.yaml", {"model": "yaml/model", "trainer": {"lr": 1e-4}})
    res = CliRunner().invoke(app, ["config", "show", "-c", str(cfg), "--set", "trainer.lr=1e-5",
                                   "--set", "model=cli/model"])
    assert res.exit_code == 0, res.output
    shown = yaml.safe_load(res.stdout)
    assert shown["model"] == "cli/model"
    assert shown["trainer"]["lr"] == 1e-5 and shown["trainer"]["model_path"] == "cli/model"
    assert shown["rollout"]["engine"]["model_path"] == "cli/model"


# --------------------------------------------------------------------------- eval sets


def test_implicit_heldout_set_only_for_a_generator_task() -> None:
    run = RunSettings(eval_prompts=12, eval_k=2)
    (only,) = eval_sets(None, run, DataConfig(task="countdown"))
    assert (only.name, only.n, only.k) == ("heldout", 12, 2)
    assert only.data_config(DataConfig(task="countdown")).split == "heldout"
    assert eval_sets(None, run, DataConfig(path=["x.jsonl"])) == []  # never Countdown on maths


def test_eval_set_data_inherits_rendering_but_not_rows() -> None:
    run_data = DataConfig(path=["train.jsonl"], system_prompt="Be brief.", prompt_field="q")
    own = EvalSet(name="test", data={"path": "test.jsonl"}).data_config(run_data)
    assert own.path == ["test.jsonl"] and own.system_prompt == "Be brief."
    assert own.prompt_field == "q"  # a file of its own inherits the run's field mapping...
    mapped = EvalSet(name="t2", data={"path": "t.jsonl", "prompt_field": "question"})
    assert mapped.data_config(run_data).prompt_field == "question"  # ...unless it sets its own
    split = EvalSet(name="val", data={"split": "validation"}).data_config(run_data)
    assert split.path == ["train.jsonl"] and split.split == "validation" and split.prompt_field == "q"
    cd = EvalSet(name="cd", task="countdown").data_config(run_data)
    assert cd.kind == "generator" and cd.split == "heldout"


def test_eval_sets_are_checked_before_anything_starts() -> None:
    run = RunSettings()
    with pytest.raises(ConfigError, match="unique"):
        eval_sets([{"name": "a", "task": "countdown"}, {"name": "a", "task": "countdown"}],
                  run, DataConfig())
    with pytest.raises(ConfigError, match="eval"):
        eval_sets([{"name": "a", "kk": 3}], run, DataConfig())


def test_eval_list_reaches_the_launcher_through_the_resolved_config(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "c.yaml", {"eval": [{"name": "t", "task": "countdown", "every": 5}]})
    raw = RunConfig.load(cfg, ['eval=[{"name": "u", "task": "countdown", "every": 2}]'],
                         sections=()).raw
    (s,) = eval_sets(raw["eval"], RunSettings(), DataConfig())
    assert (s.name, s.every) == ("u", 2)


# --------------------------------------------------------------------------- hub resolution


def test_hub_model_cache_hit_and_miss(hub_cache: Path) -> None:
    snap = _lay_out(hub_cache, "model", "me/tiny", {"config.json": "{}"})
    assert resolve("me/tiny") == snap
    with pytest.raises(HubError, match="not in the Hugging Face cache"):
        resolve("me/absent")
    with pytest.raises(HubError, match="does not exist"):
        resolve("runs/models/nothing-here")  # a path, never sent to the hub


def test_hub_dataset_rows_with_field_mapping(hub_cache: Path) -> None:
    rows = [{"question": f"What is {i}+1?", "final": str(i + 1), "uid": f"q{i}"} for i in range(5)]
    _lay_out(hub_cache, "dataset", "me/maths",
             {"data/train.jsonl": "\n".join(json.dumps(r) for r in rows) + "\n"})
    cfg = DataConfig(hf_dataset="me/maths", prompt_field="question", answer_field="final",
                     id_field="uid")
    got = load_rows(cfg, seed=0)
    assert [(r.prompt_id, r.prompt, r.answer, r.task) for r in got] == \
        [(r["uid"], r["question"], r["final"], "math") for r in rows]
    with pytest.raises(DataError, match="not in the Hugging Face cache"):
        load_rows(DataConfig(hf_dataset="me/other"), seed=0)


def test_local_parquet_and_arrow(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "1+1?", "answer": "2"}, {"prompt": "", "answer": "0"}])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    rows = load_rows(DataConfig(path=[str(tmp_path / "d.parquet")]), seed=0)
    assert [(r.prompt, r.answer) for r in rows] == [("1+1?", "2")]  # the empty prompt is skipped
    ds.save_to_disk(str(tmp_path / "arrow"))
    arrow = sorted((tmp_path / "arrow").glob("*.arrow"))
    assert [r.answer for r in load_rows(DataConfig(path=[str(a) for a in arrow]), seed=0)] == ["2"]
    (tmp_path / "d.txt").write_text("1+1? 2\n")
    with pytest.raises(DataError, match="format"):
        load_rows(DataConfig(path=[str(tmp_path / "d.txt")]), seed=0)


# --------------------------------------------------------------------------- the launcher


def _run_cfg(tmp_path: Path, model: str, **extra) -> Path:
    return _write(tmp_path / "run.yaml", {
        "model": model,
        "run": {"dir": str(tmp_path / "run"), "bootstrap": True, "eval_prompts": 0},
        "verifier": {"port": 0}, "rollout": {"port": 0}, "teacher": {"port": 0}, **extra})


def test_a_missing_user_model_is_never_replaced_by_the_tiny_one(tmp_path: Path) -> None:
    from rlrt.launch import LaunchError, LocalRun

    run = LocalRun(_run_cfg(tmp_path, str(tmp_path / "my-model")))
    assert not run.is_tiny_model()
    with pytest.raises(LaunchError, match="does not exist"):
        run.preflight()
    assert not (tmp_path / "my-model").exists()


def test_only_the_builtin_path_is_bootstrapped(tmp_path: Path, monkeypatch) -> None:
    from rlrt.launch import LocalRun

    monkeypatch.chdir(tmp_path)  # the built-in path is relative to where rlrt runs
    run = LocalRun(_run_cfg(tmp_path, "runs/models/countdown-tiny"))
    assert run.is_tiny_model()
    run.preflight()  # missing, but it is the one model `rlrt train` builds


def test_hub_model_resolved_once_and_children_get_the_directory(tmp_path: Path, hub_cache: Path,
                                                                monkeypatch) -> None:
    from rlrt.launch import LocalRun

    snap = _lay_out(hub_cache, "model", "me/policy", {"config.json": "{}"})
    char_tokenizer().save_pretrained(str(snap))  # the preflight renders prompts with it
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    run = LocalRun(_run_cfg(tmp_path, "me/policy"))
    plan = run.preflight()
    assert run.model_path == snap
    env = plan.child_env(None)
    assert "HF_HUB_OFFLINE" not in env  # children may reach the hub when the user can
    # The children read the resolved file, with no override in their environment.
    child = RunConfig.load(run.resolved_path, environ=env)
    assert child.rollout.engine.model_path == str(snap)
    assert child.trainer.model_path == str(snap)


def test_hub_model_missing_offline_is_one_clear_error(tmp_path: Path, hub_cache: Path) -> None:
    from rlrt.launch import LaunchError, LocalRun

    with pytest.raises(LaunchError, match="me/absent.*not in the Hugging Face cache"):
        LocalRun(_run_cfg(tmp_path, "me/absent")).preflight()


def test_verifier_reads_the_runs_tasks_without_loading_the_trainer(tmp_path: Path) -> None:
    """`rlrt serve verifier` allows the run's own tasks; it must not need torch to find them."""
    import subprocess
    import sys

    cfg = _write(tmp_path / "c.yaml", {"data": {"task": "mypkg.tasks:Mine", "path": "x.jsonl"},
                                       "eval": [{"name": "cd", "task": "countdown"}]})
    code = ("import json, sys; from rlrt.config import RunConfig; "
            f"cfg = RunConfig.load({str(cfg)!r}, sections=('verifier', 'bus', 'reward')); "
            "print(json.dumps([cfg.tasks(), 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert json.loads(out.stdout) == [["mypkg.tasks:Mine", "countdown"], False]
