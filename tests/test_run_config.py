"""One resolved config (rlrt/config.py, protocol/config.py): YAML, the environment form and
--set mean the same for every preset and every knob; unknown keys anywhere get a "did you mean";
run.dir is the run's one folder; the resolved file round-trips without secrets; every entry
point prints the config it would run."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from pydantic import BaseModel, SecretStr
from typer.testing import CliRunner

from protocol.config import SECTIONS, ConfigError, env_var
from rlrt.cli import app
from rlrt.config import RunConfig, section_model
from trainer.algorithm.config import PRESETS

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "countdown-tiny.yaml"


@pytest.fixture(autouse=True)
def _no_overrides_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for var in list(os.environ):
        if var.startswith("RLRT_") or var == "REDIS_URL":
            monkeypatch.delenv(var)


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _three_forms(tmp_path: Path, base: dict, path: list[str], value: Any) -> list[Any]:
    """The resolved config (whole, typed, secrets shown masked) with `path` = `value` given in
    the YAML, as an environment variable and as --set; a ConfigError is a result too."""
    text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
    text = text.removesuffix("\n...").strip()
    in_yaml: dict = yaml.safe_load(yaml.safe_dump(base))
    tree = in_yaml
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value
    forms = [(_write(tmp_path / "yaml.yaml", in_yaml), [], {}),
             (_write(tmp_path / "base.yaml", base), [], {env_var(path): text}),
             (tmp_path / "base.yaml", [f"{'.'.join(path)}={text}"], {})]
    out = []
    for cfg_path, sets, environ in forms:
        try:
            out.append(RunConfig.load(cfg_path, sets, environ=environ).to_dict())
        except ConfigError as e:
            out.append(("error", str(e).split(": ", 1)[-1].split(" (got")[0]))
    return out


# --------------------------------------------------------------------------- one meaning


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_from_yaml_env_and_set_is_the_same(tmp_path: Path, preset: str) -> None:
    """--set trainer.algorithm.preset used to keep the YAML preset's expanded knobs."""
    other = "rlsd" if preset != "rlsd" else "rlrt"
    base = {"model": "m", "trainer": {"algorithm": {"preset": other}}}
    yaml_form, env_form, set_form = _three_forms(tmp_path, base, ["trainer", "algorithm", "preset"], preset)
    assert yaml_form == env_form == set_form
    alg = yaml_form["trainer"]["algorithm"]
    assert alg["preset"] == preset
    for knob, value in PRESETS[preset].items():  # the named preset's own knobs, not rlsd's
        assert alg[knob] == value, (preset, knob)


def _leaves(model: type[BaseModel], prefix: list[str]) -> typing.Iterator[tuple[list[str], Any]]:
    """Every scalar field below `model` with a value different from its default."""
    for name, field in model.model_fields.items():
        path = [*prefix, name]
        kind = field.annotation
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None -> X
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if typing.get_origin(kind) is typing.Annotated:
            kind = typing.get_args(kind)[0]
        default = field.get_default(call_default_factory=True)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield from _leaves(kind, path)
        elif typing.get_origin(kind) is Literal:
            yield from ((path, v) for v in typing.get_args(kind) if v != default)
        elif kind is bool:
            yield path, not default
        elif kind in (int, float):
            yield path, (default or 0) + 1
        elif kind in (str, SecretStr):
            yield path, "x0123"  # digits: a text field keeps the text as written


@pytest.mark.parametrize("section", [s for s in SECTIONS if s != "trainer"] + ["trainer"])
def test_every_knob_means_the_same_in_yaml_env_and_set(tmp_path: Path, section: str) -> None:
    base = {"model": "m"}
    checked = 0
    for path, value in _leaves(section_model(section), [section]):
        forms = _three_forms(tmp_path, base, path, value)
        assert forms[0] == forms[1] == forms[2], (path, value, forms)
        checked += 1
    assert checked >= 3


def test_text_fields_keep_their_text(tmp_path: Path) -> None:
    cfg = RunConfig.load(None, ["run.name=0123", "bus.prefix=yes", "trainer.lr=1e-5", "model=m",
                                "data.knobs.min_used=3"])
    assert cfg.run.name == "0123" and cfg.bus.prefix == "yes"
    assert cfg.trainer.lr == 1e-5 and cfg.trainer.data.knobs == {"min_used": 3}


# --------------------------------------------------------------------------- unknown keys


def test_unknown_top_level_key_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "c.yaml", {"model": "m", "rewards": {"functions": ["x"]}})
    with pytest.raises(ConfigError, match=r"unknown key 'rewards'; did you mean 'reward'\?"):
        RunConfig.load(cfg)


@pytest.mark.parametrize("cfg, sets, words", [
    ({"model": "m", "trainer": {"algorithm": {"lamm": 0.3}}}, [],
     r"trainer\.algorithm\.lamm: unknown key; did you mean 'lam'\?"),
    ({"model": "m", "trainer": {"sampling": {"temprature": 1.0}}}, [],
     r"trainer\.sampling\.temprature: unknown key; did you mean 'temperature'\?"),
    ({"model": "m", "rollout": {"engine": {"knd": "cpu"}}}, [],
     r"rollout\.engine\.knd: unknown key; did you mean 'kind'\?"),
    ({"model": "m"}, ["trainer.lrr=1e-5"], r"trainer\.lrr: unknown key; did you mean 'lr'\?"),
    ({"model": "m"}, ["rewrd.x=1"], r"unknown key 'rewrd'; did you mean 'reward'\?"),
    ({"model": "m", "eval": [{"name": "a", "task": "countdown", "evry": 2}]}, [],
     r"eval\.0\.evry: unknown key; did you mean 'every'\?"),
])
def test_unknown_nested_keys_and_sets_get_a_suggestion(tmp_path: Path, cfg: dict, sets: list,
                                                        words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        RunConfig.load(_write(tmp_path / "c.yaml", cfg), sets)


def test_a_misspelt_secret_is_never_shown(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "c.yaml", {"verifier": {"tokn": "s3cr3t-value"}})
    with pytest.raises(ConfigError, match="did you mean 'token'") as e:
        RunConfig.load(cfg)
    assert "s3cr3t-value" not in str(e.value)


# --------------------------------------------------------------------------- one folder


def test_every_output_defaults_under_run_dir(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "c.yaml", {"model": "m", "run": {"dir": str(tmp_path / "X")}})
    trainer = RunConfig.load(cfg).trainer
    assert Path(trainer.output_dir) == tmp_path / "X" / "trainer"
    assert trainer.checkpoint_root == tmp_path / "X" / "trainer" / "checkpoints"
    assert trainer.weights_root == tmp_path / "X" / "trainer" / "weights"
    # the environment form of run.dir moves it too; a stated output_dir wins
    moved = RunConfig.load(cfg, environ={"RLRT_RUN__DIR": str(tmp_path / "Y")}).trainer
    assert Path(moved.output_dir) == tmp_path / "Y" / "trainer"
    own = RunConfig.load(cfg, ["trainer.output_dir=elsewhere"]).trainer
    assert own.output_dir == "elsewhere"


@pytest.mark.parametrize("name", ["countdown-tiny", "countdown-active", "countdown-vllm",
                                  "paper/rlrt", "paper/grpo", "paper/rlsd"])
def test_shipped_configs_state_no_path_twice(name: str) -> None:
    path = REPO / "configs" / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    assert "output_dir" not in raw.get("trainer", {})  # implied by run.dir
    cfg = RunConfig.load(path)
    assert Path(cfg.trainer.output_dir) == Path(cfg.run.dir) / "trainer"


# --------------------------------------------------------------------------- the resolved file


def test_resolved_file_round_trips_without_secrets(tmp_path: Path) -> None:
    token, password = "tok-" + "a1" * 8, "pw-" + "b2" * 8
    cfg = _write(tmp_path / "c.yaml", {
        "model": "m", "data": {"task": "countdown", "num_prompts": 10},
        "eval": [{"name": "cd", "task": "countdown", "every": 2}],
        "run": {"dir": str(tmp_path / "run"), "control_token": token},
        "bus": {"redis_url": f"redis://:{password}@127.0.0.1:6390/0"},
        "trainer": {"algorithm": {"preset": "rlrt", "model_kind": "instruct"}}})
    first = RunConfig.load(cfg, ["trainer.algorithm.preset=rlsd", "trainer.lr=3e-5"])
    out = first.write(tmp_path / "run" / "config.resolved.yaml")
    text = out.read_text()
    assert token not in text and password not in text
    # A process reading the file, given the secrets by its environment, runs the same config.
    again = RunConfig.load(out, environ=first.secret_env())
    assert again.to_dict() == first.to_dict()
    assert again.run.control_token.get_secret_value() == token
    assert again.trainer.algorithm.preset == "rlsd" and again.trainer.lr == 3e-5
    assert [s.name for s in again.eval_sets] == ["cd"]


def test_the_launcher_writes_the_file_every_child_reads(tmp_path: Path, monkeypatch) -> None:
    """ports, push targets and a --set stream rename reach every process's config; the
    children's environment carries no override (it would be applied twice)."""
    from rlrt.launch import LocalRun

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cfg = _write(tmp_path / "c.yaml", {
        "model": str(model), "run": {"dir": str(tmp_path / "run"), "bootstrap": False,
                                     "eval_prompts": 0},
        "verifier": {"port": 0}, "rollout": {"port": 0}, "teacher": {"port": 0},
        "trainer": {"algorithm": {"preset": "rlrt"}}})  # a preset that runs a teacher
    monkeypatch.setenv("RLRT_TRAINER__LR", "3e-4")  # the user's environment form
    run = LocalRun(cfg, sets=["bus.streams.rollouts=rollouts-v2", "trainer.lr=1e-5"])
    run.ports = {"verifier": 18300, "rollout": 18310, "teacher": 18320}
    plan = run.write_resolved()
    env = plan.child_env(None)
    assert "RLRT_TRAINER__LR" not in env
    for name, sections in {"verifier": ("verifier", "bus", "reward"), "rollout": ("rollout", "bus"),
                           "teacher": ("teacher", "bus"), "trainer": ("trainer", "bus")}.items():
        child = RunConfig.load(run.resolved_path, sections=sections, environ=env)
        assert child.bus.stream("rollouts") == f"{child.bus.prefix}:rollouts-v2", name
        if name != "trainer":
            assert child[name].port == run.ports[name]
            assert child[name].token.get_secret_value() == run.token
    trainer = RunConfig.load(run.resolved_path, environ=plan.trainer_env(None)).trainer
    assert trainer.lr == 1e-5  # --set beat the environment, once
    assert [(s.name, s.url) for s in trainer.push.services] == [
        ("rollout", "http://127.0.0.1:18310"), ("teacher", "http://127.0.0.1:18320")]
    assert trainer.push.control_token.get_secret_value() == run.token
    assert str(model) == trainer.model_path == RunConfig.load(run.resolved_path).rollout.engine.model_path


# --------------------------------------------------------------------------- --print-config


@pytest.mark.parametrize("argv, sections", [
    (["train"], set(SECTIONS) | {"model", "data"}),
    (["eval"], set(SECTIONS) | {"model", "data"}),
    (["run-trainer"], {"trainer", "bus"}),
    (["serve", "verifier"], {"verifier", "bus", "reward"}),
    (["serve", "rollout"], {"rollout", "bus"}),
    (["serve", "teacher"], {"teacher", "bus"}),
])
def test_every_entry_point_prints_the_config_it_would_run(argv: list[str], sections: set) -> None:
    res = CliRunner().invoke(app, [*argv, "-c", str(TINY), "--print-config",
                                   "--set", "trainer.algorithm.preset=dr_grpo",
                                   "--set", "bus.prefix=printed"])
    assert res.exit_code == 0, res.output
    shown = yaml.safe_load(res.stdout)
    assert set(shown) == sections
    assert shown["bus"]["prefix"] == "printed"
    if "trainer" in shown:
        assert shown["trainer"]["algorithm"]["std_norm"] is False  # dr_grpo's, applied
        assert shown["trainer"]["output_dir"] == "runs/countdown-tiny/trainer"


def test_trainer_main_prints_the_config_it_would_run(capsys: pytest.CaptureFixture) -> None:
    from trainer.main import main

    main(["-c", str(TINY), "--print-config", "--set", "trainer.total_steps=3"])
    shown = yaml.safe_load(capsys.readouterr().out)
    assert set(shown) == {"trainer", "bus"}
    assert shown["trainer"]["total_steps"] == 3
    assert shown["trainer"]["model_path"] == "runs/models/countdown-tiny"  # top-level model:


def test_trainer_main_config_error_is_one_line(capsys: pytest.CaptureFixture) -> None:
    from trainer.main import main

    with pytest.raises(SystemExit) as e:
        main(["-c", str(TINY), "--print-config", "--set", "trainer.lrr=1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'lr'" in err
