"""What a local run starts, decided from its config alone: argv and environment per process.

`RunPlan` is pure: it reads the run's config (and the environment it is given) and returns
the processes' command lines, environments and the wiring written into the resolved config
file; it starts nothing, opens no port and writes no file. rlrt/launch.py prepares a run
(checks, ports, hub models) and builds the plan; rlrt/supervisor.py starts and keeps the
processes it names; rlrt/train.py ties them to the evaluation and the report.

The per-service facts (which stage runs an engine, its health route) come from the topology
table (protocol/topology.py). Each override reaches a child by one channel: the resolved config
file (ports included); the environment carries only secrets, Redis's URL and process knobs.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.config import override_path
from protocol.topology import ENGINE_STAGES, HEALTH_ROUTES
from protocol.trace import ENV as TRACE_ENV
from rlrt.config import RunConfig
from rlrt.processes import RENDEZVOUS_VARS, rlrt_argv

READY_ROUTE = HEALTH_ROUTES[1]  # /readyz: 200 once the service can work


@dataclass(frozen=True)
class ProcSpec:
    """One process of the run, as the supervisor starts it."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path | None  # None: the launcher's terminal (the trainer)
    ready_url: str | None


def runs_teacher(cfg: RunConfig) -> bool:
    """Whether the run needs a teacher service: not for a preset that never scores (teacher
    scope none: grpo, dr_grpo), whose groups go from the verifier to the trainer -- unless the
    config asks for teacher_version match_s, whose re-score requests need a teacher to answer."""
    alg = cfg["trainer"].algorithm
    return alg.scope != "none" or alg.teacher_version_rule == "match_s"


def needed_services(cfg: RunConfig, requested: tuple[str, ...]) -> tuple[str, ...]:
    """The services of `requested` (in order) that this run needs."""
    return tuple(n for n in requested if n != "teacher" or runs_teacher(cfg))


def wiring(cfg: RunConfig, services: tuple[str, ...], ports: Mapping[str, int],
           model_path: Path) -> dict[str, dict[str, Any]]:
    """The launcher's own choices, which no --set may undo: each service's port, the CPU
    engines' model (the trainer's where none is given), the trainer's push targets (the
    engine services that run; none to a service the run does not start) and its input (the
    teacher's output, or the verifier's when the run needs no teacher)."""
    out: dict[str, dict[str, Any]] = {name: {"port": ports[name]} for name in services}
    for name in services:
        if name in ENGINE_STAGES and cfg[name].engine.kind == "cpu" and not cfg[name].engine.model_path:
            out[name]["engine"] = {"model_path": str(model_path)}
    out["trainer"] = {"teacher_service": runs_teacher(cfg), "push": {"services": [
        {"name": n, "url": service_url(cfg, n, ports)} for n in services if n in ENGINE_STAGES]}}
    return out


def service_url(cfg: RunConfig, name: str, ports: Mapping[str, int]) -> str:
    return f"http://{cfg[name].host}:{ports[name]}"


@dataclass(frozen=True)
class RunPlan:
    """The processes of one local run (see the module docstring). `cfg` is the resolved config
    (wiring included) that `resolved_path` holds once the launcher has written it."""

    cfg: RunConfig
    config_path: Path
    sets: tuple[str, ...]
    services: tuple[str, ...]
    ports: Mapping[str, int]
    token: str
    resolved_path: Path
    resume: bool = False
    trainer_args: tuple[str, ...] = ()  # --resume-from / --allow-config-change
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg["run"].dir).resolve()

    def url(self, name: str) -> str:
        return service_url(self.cfg, name, self.ports)

    def _abs(self, p: str | Path) -> Path:
        # The trainer's paths are relative to where rlrt runs (the children's cwd too).
        p = Path(p)
        return p if p.is_absolute() else Path.cwd() / p

    @property
    def trainer_out(self) -> Path:
        return self._abs(self.cfg["trainer"].output_dir)

    @property
    def metrics_path(self) -> Path:
        return self.trainer_out / "metrics.jsonl"

    @property
    def checkpoint_root(self) -> Path:
        return self._abs(self.cfg["trainer"].checkpoint_root)

    @property
    def weights_root(self) -> Path:
        return self._abs(self.cfg["trainer"].weights_root)

    @property
    def resume_command(self) -> str:
        sets = "".join(f" --set {shlex.quote(item)}" for item in self.sets)
        return f"rlrt train --config {self.config_path}{sets} --resume"

    def child_env(self, redis_url: str | None) -> dict[str, str]:
        """Every child's environment. The resolved config file holds every override already:
        one given again through the environment would be applied twice (and beat a --set).
        Secrets are not in the file: they come here, with the launcher's own token."""
        env = {k: v for k, v in self.environ.items() if override_path(k) is None}
        env.update(self.cfg.secret_env())
        env.update({
            "REDIS_URL": redis_url or "",
            "RLRT_BUS__REDIS_URL": redis_url or "",
            "TOKENIZERS_PARALLELISM": "false",
            "DS_ACCELERATOR": env.get("DS_ACCELERATOR", "cpu"),
            "PYTHONUNBUFFERED": "1",
        })
        if self.cfg["run"].trace:  # spans of every process (protocol/trace.py)
            env[TRACE_ENV] = str(self.run_dir / "trace")
        for name in self.services:
            env[f"RLRT_{name.upper()}__TOKEN"] = self.token
        return env

    def service(self, name: str, redis_url: str | None) -> ProcSpec:
        return ProcSpec(name, rlrt_argv("serve", name, "--config", str(self.resolved_path)),
                        self.child_env(redis_url), self.run_dir / "logs" / f"{name}.log",
                        f"{self.url(name)}{READY_ROUTE}")

    def trainer_env(self, redis_url: str | None) -> dict[str, str]:
        env = self.child_env(redis_url)
        for key in RENDEZVOUS_VARS:
            env.pop(key, None)
        env["RLRT_TRAINER__PUSH__CONTROL_TOKEN"] = self.token
        return env

    def trainer(self, redis_url: str | None) -> ProcSpec:
        argv = rlrt_argv("run-trainer", "--config", str(self.resolved_path))
        if self.resume:
            argv.append("--resume")
        return ProcSpec("trainer", [*argv, *self.trainer_args], self.trainer_env(redis_url),
                        None, None)
