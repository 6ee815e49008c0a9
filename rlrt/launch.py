"""Preparing `rlrt train` / `rlrt eval`: the config, its models, the checks, the plan.

`LocalRun` loads the run's config (with --set overrides), resolves hub ids among its models to
local directories, checks everything that can be checked before a process starts (one clear
error each: `LaunchError`), picks the ports and writes the resolved config every child reads.
What it produces is a `RunPlan` (rlrt/plan.py: argv and environment per process). Starting and
keeping the processes is rlrt/supervisor.py's; the training run as a whole (evaluation before,
during and after, the report) is rlrt/train.py's.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import redis
from rich.console import Console

from protocol.config import RESOLVED_NAME, TINY_MODEL, ConfigError, redact_url, secret_value
from protocol.topology import ENGINE_STAGES, SERVICES
from rlrt.config import RunConfig
from rlrt.engine_servers import EngineServerError, EngineServers
from rlrt.plan import RunPlan, needed_services, wiring
from rlrt.preflight import PreflightError, check_run
from rlrt.processes import free_port, port_free
from rlrt.run_config import EvalSet
from tasks.hub import HubError, looks_like_hub_id, resolve


class LaunchError(RuntimeError):
    """A problem found before or while starting the run: one line for the user."""


class LocalRun:
    """One local run being prepared (see the module docstring): `preflight` returns its plan."""

    def __init__(self, config_path: str | Path, *, resume: bool = False,
                 services: tuple[str, ...] = SERVICES, console: Console | None = None,
                 sets: list[str] | None = None, trainer_args: list[str] | None = None,
                 resolved_name: str = RESOLVED_NAME) -> None:
        self.config_path = Path(config_path).resolve()
        self.resume = resume
        self.trainer_args = trainer_args or []  # --resume-from / --allow-config-change
        self.requested = services  # what the command runs; the config may need fewer
        self.console = console or Console(stderr=True)
        # --set overrides of this run; the children get them in the resolved config file.
        self.sets = [*(sets or [])]
        self._load()
        self.services = needed_services(self.cfg, self.requested)
        self.run = self.cfg["run"]
        self.run_dir = Path(self.run.dir).resolve()
        # What every child reads (rlrt/config.py), written by preflight(): `rlrt eval` names
        # its own, so it never changes the file a training run in the same folder restarts from.
        self.resolved_path = self.run_dir / resolved_name
        self.token = secret_value(self.run.control_token) or secrets.token_hex(16)
        self.ports: dict[str, int] = {}
        self.engine_servers: EngineServers | None = None  # vLLM servers of engine.launch

    def _load(self) -> None:
        try:
            self.cfg = RunConfig.load(self.config_path, self.sets)
            self.eval_sets: list[EvalSet] = self.cfg.eval_sets
        except ConfigError as e:
            raise LaunchError(str(e)) from None
        spec = self.cfg["reward"].spec()
        if spec is not None:
            from tasks.rewards import locate

            try:
                locate(spec)  # a typo in a reward module: one line now, not a verifier's death
            except ValueError as e:
                raise LaunchError(str(e)) from None

    # ------------------------------------------------------------------ preflight
    @property
    def model_path(self) -> Path:
        return Path(self.cfg["trainer"].model_path).resolve()

    def is_tiny_model(self) -> bool:
        """The trainer's model is the built-in tiny model's path: the only one ever built."""
        return self.model_path == Path(TINY_MODEL).resolve()

    def resolve_models(self) -> None:
        """Hub ids among the trainer's and engines' models -> their HF-cache snapshot, fetched
        once here; the children are then given the local directories (as --set overrides)."""
        refs = {"trainer.model_path": self.cfg["trainer"].model_path}
        for name in self.services:
            if name in ENGINE_STAGES and self.cfg[name].engine.model_path:
                refs[f"{name}.engine.model_path"] = self.cfg[name].engine.model_path
        extra = []
        for key, ref in refs.items():
            if Path(ref).exists() or not looks_like_hub_id(ref):
                continue  # a local directory, or a missing one preflight reports
            with self.console.status(f"resolving model {ref} (Hugging Face cache / hub) ..."):
                try:
                    local = resolve(ref, "model")
                except HubError as e:
                    raise LaunchError(str(e)) from None
            self.console.print(f"[dim]model {ref}: {local}[/]")
            extra.append(f"{key}={local}")
        if extra:
            self.sets += extra
            self._load()

    def preflight(self) -> RunPlan:
        """Everything that can be checked before a process starts, one clear error each; then
        the ports, the resolved config file and the plan (`write_resolved`)."""
        self.resolve_models()
        for name in self.services:
            c = self.cfg[name]
            port = c.port or free_port(c.host)
            if not port_free(c.host, port):
                raise LaunchError(f"{name}: port {port} on {c.host} is already taken "
                                  f"(set {name}.port in the config, or 0 for any free port)")
            self.ports[name] = port
        if not self.model_path.exists():
            if not self.is_tiny_model():
                raise LaunchError(f"model directory {self.model_path} does not exist (give a "
                                  "local HF model directory or a hub id as `model:`)")
            if not self.run.bootstrap:
                raise LaunchError(f"model directory {self.model_path} does not exist "
                                  "(run `rlrt bootstrap`, or set run.bootstrap: true)")
        if self.model_path.exists() and not (self.model_path / "config.json").exists():
            raise LaunchError(f"{self.model_path} is not a Hugging Face model directory (no config.json)")
        url = self.cfg["bus"].redis_url  # an external Redis (none: the run's own, started later)
        if url:
            try:
                redis.Redis.from_url(url, socket_connect_timeout=3).ping()
            except (redis.RedisError, OSError) as e:
                raise LaunchError(f"Redis at {redact_url(url)} is unreachable: {e}") from None
        try:  # what the user wrote (data, eval sets, template, rewards): rlrt/preflight.py
            check_run(self.cfg["trainer"].data, self.eval_sets, seed=self.cfg["trainer"].seed,
                      reward=self.cfg["reward"].spec(), model_dir=self.model_path,
                      log=lambda m: self.console.print(f"[dim]{m}[/]"))
        except PreflightError as e:
            raise LaunchError(str(e)) from None
        try:
            self.engine_servers = EngineServers(self.cfg, self.services, self.run_dir,
                                                self.model_path, log=self.console.print)
        except EngineServerError as e:
            raise LaunchError(str(e)) from None
        return self.write_resolved()

    def write_resolved(self) -> RunPlan:
        """Resolve the config once more with the launcher's own choices (rlrt/plan.py
        `wiring`: ports, the CPU engines' model, the trainer's push targets; the engine servers'
        URLs), which no --set may undo, write it where every child reads it, and return the
        plan of the run's processes."""
        engine_env = self.engine_servers.service_env() if self.engine_servers else {}
        try:
            self.cfg = RunConfig.load(self.config_path, self.sets,
                                      overrides=wiring(self.cfg, self.services, self.ports,
                                                       self.model_path),
                                      environ={**os.environ, **engine_env})
        except ConfigError as e:
            raise LaunchError(str(e)) from None
        self.cfg.write(self.resolved_path)
        return self.make_plan()

    def make_plan(self) -> RunPlan:
        """The plan of this run's processes from the config as it stands (see write_resolved)."""
        return RunPlan(self.cfg, self.config_path, tuple(self.sets), self.services,
                       dict(self.ports), self.token, self.resolved_path, resume=self.resume,
                       trainer_args=tuple(self.trainer_args))

    def bootstrap_if_needed(self) -> None:
        if self.model_path.exists() or not self.is_tiny_model():
            return
        from trainer.bootstrap.run import bootstrap

        self.console.print(f"no model at {self.model_path}: bootstrapping the tiny Countdown model")
        bootstrap(self.model_path, seed=self.run.seed, steps=self.run.bootstrap_steps,
                  log=lambda m: self.console.print(f"[dim]{m}[/]"))
