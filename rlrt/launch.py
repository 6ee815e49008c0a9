"""`rlrt train`: the whole system on one machine, as separate processes.

    embedded Redis  ->  verifier, rollout, teacher services  ->  held-out eval  ->  trainer
                    ->  held-out eval  ->  report

The launcher supervises: a service that dies is named, restarted and given the current
weights; if that keeps failing, the trainer is stopped with SIGTERM (it checkpoints) and the run
can be continued with `--resume`. The embedded Redis is a child like the others: restarted on
its own AOF directory if it dies (every process reconnects and resumes), dead with the launcher
(parent-death signal), never started twice on one directory. Where the run cannot go on, the
last line says why and gives the `--resume` command. Ctrl-C stops everything in order and
leaves no process.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import redis
from rich.console import Console

from protocol.config import (
    RESOLVED_NAME,
    TINY_MODEL,
    ConfigError,
    override_path,
    redact_url,
    secret_value,
)
from protocol.messages import WeightUpdate
from protocol.topology import ENGINE_STAGES, SERVICES
from protocol.weights_client import WeightsClient, newest_weights
from rlrt.config import RunConfig
from rlrt.engine_servers import EngineServerError, EngineServers
from rlrt.eval_runner import EvalRunner, steps_done
from rlrt.evaluate import EvalError
from rlrt.preflight import PreflightError, check_run
from rlrt.processes import Child, free_port, port_free, rlrt_argv
from rlrt.redis_server import AofDamaged, EmbeddedRedis, RedisDirBusy
from rlrt.run_config import EvalSet
from rlrt.trainer_stop import stop_trainer
from tasks.data import DataError
from tasks.hub import HubError, looks_like_hub_id, resolve
from trainer.disk import EXIT_DISK_FULL


class LaunchError(RuntimeError):
    """A problem found before or while starting the run: one line for the user."""


# supervise()'s return code when it stopped a stalled run (not the trainer's own exit code)
STALLED = -1000


class LocalRun:
    def __init__(self, config_path: str | Path, *, resume: bool = False,
                 services: tuple[str, ...] = SERVICES, console: Console | None = None,
                 sets: list[str] | None = None, evals_before: dict | None = None,
                 trainer_args: list[str] | None = None, resolved_name: str = RESOLVED_NAME) -> None:
        self.config_path = Path(config_path).resolve()
        self.resume = resume
        self.trainer_args = trainer_args or []  # --resume-from / --allow-config-change
        # The "before training" evaluation measured elsewhere on this very model, prompts and
        # sampling seed (`rlrt experiment` measures it once and hands it to every later run).
        self.shared_evals_before = evals_before
        self.services = services
        self.console = console or Console(stderr=True)
        # --set overrides of this run; the children get them in the resolved config file.
        self.sets = [*(sets or [])]
        self._load()
        self.run = self.cfg["run"]
        self.run_dir = Path(self.run.dir).resolve()
        # What every child reads (rlrt/config.py), written by preflight(): `rlrt eval` names
        # its own, so it never changes the file a training run in the same folder restarts from.
        self.resolved_path = self.run_dir / resolved_name
        self.token = secret_value(self.run.control_token) or secrets.token_hex(16)
        self.redis: EmbeddedRedis | None = None
        self.redis_url: str | None = self.cfg["bus"].redis_url
        self.children: dict[str, Child] = {}
        self.ports: dict[str, int] = {}
        self.trainer: Child | None = None
        self._stopping = False
        self.evals: EvalRunner | None = None
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

    def preflight(self) -> None:
        """Everything that can be checked before a process starts; one clear error each."""
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
        if self.redis_url:
            try:
                redis.Redis.from_url(self.redis_url, socket_connect_timeout=3).ping()
            except (redis.RedisError, OSError) as e:
                raise LaunchError(f"Redis at {redact_url(self.redis_url)} is unreachable: {e}") from None
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
        self.write_resolved()

    def write_resolved(self) -> None:
        """Resolve the config once more with the launcher's own choices (ports, the CPU
        engines' model, the trainer's push targets, the engine servers' URLs), which no --set
        may undo, and write it where every child reads it."""
        wiring: dict[str, dict[str, Any]] = {name: {"port": self.ports[name]} for name in self.services}
        for name in self.services:
            if name in ENGINE_STAGES and self.cfg[name].engine.kind == "cpu" \
                    and not self.cfg[name].engine.model_path:
                wiring[name]["engine"] = {"model_path": str(self.model_path)}
        wiring["trainer"] = {"push": {"services": [
            {"name": n, "url": self.url(n)} for n in self.services if n in ENGINE_STAGES]}}
        engine_env = self.engine_servers.service_env() if self.engine_servers else {}
        try:
            self.cfg = RunConfig.load(self.config_path, self.sets, overrides=wiring,
                                      environ={**os.environ, **engine_env})
        except ConfigError as e:
            raise LaunchError(str(e)) from None
        self.cfg.write(self.resolved_path)

    # ------------------------------------------------------------------ processes
    def child_env(self) -> dict[str, str]:
        # The resolved config file holds every override already: one given again through the
        # environment would be applied twice (and beat a --set). Secrets are not in the file:
        # they come here, with the launcher's own.
        env = {k: v for k, v in os.environ.items() if override_path(k) is None}
        env.update(self.cfg.secret_env())
        env.update({
            "REDIS_URL": self.redis_url or "",
            "RLRT_BUS__REDIS_URL": self.redis_url or "",
            "TOKENIZERS_PARALLELISM": "false",
            "DS_ACCELERATOR": env.get("DS_ACCELERATOR", "cpu"),
            "PYTHONUNBUFFERED": "1",
        })
        for name in self.services:
            env[f"RLRT_{name.upper()}__TOKEN"] = self.token
        return env

    @property
    def metrics_path(self) -> Path:
        out = Path(self.cfg["trainer"].output_dir)
        return (out if out.is_absolute() else Path.cwd() / out) / "metrics.jsonl"

    def url(self, name: str) -> str:
        return f"http://{self.cfg[name].host}:{self.ports[name]}"

    def start_redis(self) -> None:
        if self.redis_url:
            return
        self.redis = EmbeddedRedis(self.run_dir / "redis")
        try:
            self.redis_url = self.redis.start()
        except RedisDirBusy as e:
            raise LaunchError(f"{e} (is this run still running, e.g. a killed launcher's "
                              "trainer finishing its step?)") from None
        except AofDamaged as e:
            raise LaunchError(f"{e}. Then: {self.resume_command}") from None
        self.console.print(f"[dim]redis: {self.redis_url}[/]")

    @property
    def resume_command(self) -> str:
        import shlex

        sets = "".join(f" --set {shlex.quote(item)}" for item in self.sets)
        return f"rlrt train --config {self.config_path}{sets} --resume"

    def redis_problem(self) -> str | None:
        """Why Redis cannot be reached now, or None if it answers."""
        if not self.redis_url:
            return None
        try:
            redis.Redis.from_url(self.redis_url, socket_connect_timeout=3, socket_timeout=3).ping()
            return None
        except (redis.RedisError, OSError) as e:
            return f"{type(e).__name__}: {e}"

    def revive_redis(self) -> bool:
        """Restart the embedded Redis on its AOF directory (nothing acknowledged is lost: Redis
        writes the AOF before it replies). The services and the trainer reconnect by
        themselves within bus.reconnect_timeout_s."""
        assert self.redis is not None and self.redis.proc is not None
        code = self.redis.proc.returncode
        if self.redis.restarts >= self.run.max_restarts:
            self.console.print(f"[red]redis died (exit {code}) {self.redis.restarts + 1} times; "
                               "giving up[/]")
            return False
        self.console.print(f"[yellow]redis died (exit {code}); restarting it on "
                           f"{self.redis.directory}[/] (log: {self.redis.directory / 'redis.log'})")
        try:
            self.redis.restart()
        except RuntimeError as e:
            self.console.print(f"[red]redis did not come back: {e}[/]")
            return False
        self.console.print("redis back; the services and the trainer reconnect")
        return True

    def start_service(self, name: str) -> Child:
        child = Child(name, rlrt_argv("serve", name, "--config", str(self.resolved_path)),
                      self.child_env(), log_path=self.run_dir / "logs" / f"{name}.log",
                      ready_url=f"{self.url(name)}/readyz")
        child.start()
        self.children[name] = child
        return child

    def start_services(self) -> None:
        if self.engine_servers:
            try:
                self.engine_servers.start()
            except EngineServerError as e:
                raise LaunchError(str(e)) from None
        for name in self.services:
            self.start_service(name)
        for name in self.services:
            with self.console.status(f"waiting for {name} ..."):
                try:
                    self.children[name].wait_ready(self.run.start_timeout_s)
                except RuntimeError as e:
                    raise LaunchError(str(e)) from None
            self.console.print(f"[green]{name}[/] ready at {self.url(name)}")

    def trainer_env(self) -> dict[str, str]:
        env = self.child_env()
        # The launcher starts one trainer process on this machine: rendezvous variables
        # inherited from a caller that ran torch.distributed itself (a notebook, a test) would
        # point it at that caller's store port. trainer/dist.py picks a free one without them.
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        env["RLRT_TRAINER__PUSH__CONTROL_TOKEN"] = self.token
        return env

    def start_trainer(self) -> Child:
        argv = rlrt_argv("run-trainer", "--config", str(self.resolved_path))
        if self.resume:
            argv.append("--resume")
        argv += self.trainer_args
        self.trainer = Child("trainer", argv, self.trainer_env(), log_path=None)
        self.trainer.start()
        return self.trainer

    # ------------------------------------------------------------------ supervision
    def latest_weights(self) -> WeightUpdate | None:
        """The newest weight directory the trainer published (for a restarted service)."""
        root = self.cfg["trainer"].weights_root
        return newest_weights(root if root.is_absolute() else Path.cwd() / root, "launcher")

    def revive(self, name: str) -> bool:
        child = self.children[name]
        code = child.proc.returncode if child.proc else None
        if child.restarts >= self.run.max_restarts:
            self.console.print(f"[red]{name} died (exit {code}) {child.restarts + 1} times; giving up[/]")
            return False
        self.console.print(f"[yellow]{name} died (exit {code}); restarting[/] "
                           f"(log: {child.log_path})")
        child.restarts += 1
        try:
            child.start()
            child.wait_ready(self.run.start_timeout_s)
        except (RuntimeError, OSError) as e:
            # A service cannot come back while Redis is down (its readiness needs Redis): say
            # which, instead of a traceback.
            why = self.redis_problem()
            self.console.print(f"[red]{name} did not come back"
                               + (f": Redis is unreachable ({why})" if why else f": {e}") + "[/]")
            return False
        update = self.latest_weights()
        if update is not None:
            try:
                r = WeightsClient(name, self.url(name), self.token).post(update, timeout=300)
                self.console.print(f"{name} back at weights version {update.version} "
                                   f"({r.status_code})")
            except httpx.HTTPError as e:  # the trainer's next push brings it up to date
                self.console.print(f"[yellow]{name} back, weights not pushed yet: {e!r}[/]")
        return True

    def supervise(self) -> int:
        """Wait for the trainer; keep the services alive meanwhile. Returns its exit code."""
        assert self.trainer is not None and self.trainer.proc is not None
        # Stall watch: a pipeline that stops moving (a service alive but wedged, a dependency
        # gone) must not look like a slow step forever. The clock starts at this run's first
        # completed step: start-up and the first step (model load, engine init) may take long,
        # and the trainer's own wait_timeout_s bounds them.
        last_step, last_change, warned = steps_done(self.metrics_path), time.monotonic(), 0
        watching = False
        while self.trainer.proc.poll() is None:
            step, now = steps_done(self.metrics_path), time.monotonic()
            if step != last_step:
                last_step, last_change, warned, watching = step, now, 0, True
            elif watching and not self._stopping \
                    and now - last_change >= self.run.stall_warn_s * (warned + 1):
                warned += 1
                self.console.print(f"[yellow]no training step for {now - last_change:.0f} s "
                                   f"(after step {step}): {self.pipeline_state()}[/]")
            if watching and not self._stopping and self.run.stall_stop_s is not None \
                    and now - last_change >= self.run.stall_stop_s:
                self.console.print(f"[red]no training step for {now - last_change:.0f} s "
                                   f"(run.stall_stop_s): {self.pipeline_state()}; stopping the "
                                   "trainer; continue later with --resume[/]")
                self.trainer.stop(timeout_s=120)
                return STALLED
            if self.redis is not None and not self.redis.alive and not self._stopping \
                    and not self.revive_redis():
                self.console.print("[red]stopping the trainer; continue later with --resume[/]")
                self.trainer.stop(timeout_s=120)
                return 3
            for name, child in self.children.items():
                if not child.alive and not self._stopping and not self.revive(name):
                    self.console.print("[red]stopping the trainer; continue later with --resume[/]")
                    self.trainer.stop(timeout_s=120)
                    return 3
            for owner in self.engine_servers.dead() if self.engine_servers else []:
                if not self._stopping and not self.engine_servers.revive(  # type: ignore[union-attr]
                        owner, self.run.max_restarts, self.url, self.token, self.latest_weights()):
                    self.console.print("[red]stopping the trainer; continue later with --resume[/]")
                    self.trainer.stop(timeout_s=120)
                    return 3
            if self.evals is not None:
                self.evals.poll(steps_done(self.metrics_path), self.cfg["trainer"].total_steps)
            time.sleep(0.5)
        return self.trainer.proc.returncode

    def pipeline_state(self) -> str:
        """One line for a stalled run: per service, the entries its group has read but not
        acked, and its /readyz answer (or why there was none)."""
        from protocol.bus import Bus

        async def pending() -> dict[str, int | str]:
            bus = Bus.from_url(self.redis_url, self.cfg["bus"])
            out: dict[str, int | str] = {}
            try:
                for name in self.children:
                    c = self.cfg[name]
                    try:
                        out[name] = await asyncio.wait_for(
                            bus.pending(self.cfg["bus"].stream(c.in_stream), c.group), 2)
                    except Exception as e:  # noqa: BLE001 - a diagnosis, never a crash
                        out[name] = f"? ({type(e).__name__})"
            finally:
                await bus.close()
            return out

        try:
            held = asyncio.run(pending())
        except Exception as e:  # noqa: BLE001
            held = {name: f"? ({type(e).__name__}: {e})" for name in self.children}
        parts = []
        for name in self.children:
            try:
                r = httpx.get(self.url(name) + "/readyz", timeout=2)
                ready = f"/readyz {r.status_code} {r.text.strip()[:160]}"
            except httpx.HTTPError as e:
                ready = f"/readyz no answer ({type(e).__name__})"
            parts.append(f"{name}: {held.get(name)} in flight, {ready}")
        return "; ".join(parts)

    # ------------------------------------------------------------------ evaluation
    def eval_runner(self, sets: list[EvalSet] | None = None,
                    out: str = "eval.jsonl") -> EvalRunner:
        """The evaluation sets against this run's rollout and verifier services; results are
        appended to <run dir>/<out>."""
        from transformers import AutoTokenizer

        from protocol.bus import Bus
        from rlrt.evaluate import evaluate

        tok = AutoTokenizer.from_pretrained(str(self.model_path))
        stream = self.cfg["bus"].stream(self.cfg["rollout"].in_stream)

        def one(rows: list, **kw: Any) -> dict:
            async def go() -> dict:
                bus = Bus.from_url(self.redis_url, self.cfg["bus"])
                try:
                    return await evaluate(rows, tokenizer=tok, bus=bus, prompts_stream=stream,
                                          verifier_url=self.url("verifier"), token=self.token,
                                          seed=self.run.seed, reward=self.cfg["reward"].enabled, **kw)
                finally:
                    await bus.close()
            return asyncio.run(go())

        trainer = self.cfg["trainer"]
        return EvalRunner(self.eval_sets if sets is None else sets, run_data=trainer.data,
                          sampling=trainer.sampling, seed=self.run.seed, evaluate=one,
                          out=self.run_dir / out, log=self.console.print,
                          # The training run's evaluations go beside the trainer's curves.
                          tb_dir=Path(trainer.output_dir) / "tb"
                          if out == "eval.jsonl" and trainer.metrics.tensorboard else None)

    def evaluate_once(self, sets: list[EvalSet]) -> dict[str, dict]:
        """`rlrt eval`: start Redis + rollout + verifier, evaluate `sets`, stop."""
        if not sets:
            raise LaunchError("nothing to evaluate: the config has no eval sets and no --data was given")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.preflight()
        if not self.model_path.exists():
            raise LaunchError(f"model directory {self.model_path} does not exist")
        runner = self.eval_runner(sets, out="eval-cli.jsonl")  # not the training run's log
        for es in sets:  # a bad data set fails before anything starts
            try:
                runner.rows(es)
            except (DataError, ValueError) as e:
                raise LaunchError(f"eval set {es.name!r}: {e}") from None
        try:
            self.start_redis()
            self.start_services()
            with self.console.status("evaluating ..."):
                return runner.run_all("eval", 0)
        finally:
            self.stop_all()

    # ------------------------------------------------------------------ whole run
    def bootstrap_if_needed(self) -> None:
        if self.model_path.exists() or not self.is_tiny_model():
            return
        from trainer.bootstrap.run import bootstrap

        self.console.print(f"no model at {self.model_path}: bootstrapping the tiny Countdown model")
        bootstrap(self.model_path, seed=self.run.seed, steps=self.run.bootstrap_steps,
                  log=lambda m: self.console.print(f"[dim]{m}[/]"))

    def stop_all(self) -> None:
        self._stopping = True
        if self.trainer is not None and self.trainer.alive:  # Ctrl-C: rlrt/trainer_stop.py
            self.console.print(stop_trainer(
                self.trainer, metrics_jsonl=self.metrics_path,
                checkpoint_root=self.cfg["trainer"].checkpoint_root, log=self.console.print))
        elif self.trainer is not None:
            self.trainer.stop(timeout_s=120)
        for child in reversed(list(self.children.values())):
            child.stop(timeout_s=30)
        if self.engine_servers:
            self.engine_servers.stop()
        if self.redis is not None:
            self.redis.stop()

    def train(self) -> dict:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.preflight()
        self.bootstrap_if_needed()
        # SIGTERM behaves like Ctrl-C: stop in order.
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        report: dict[str, Any] = {"config": str(self.config_path), "run_dir": str(self.run_dir)}
        try:
            self.start_redis()
            self.start_services()
            self.evals = self.eval_runner()
            if not self.resume:  # a fresh run in an old run directory starts a fresh log
                self.evals.out.unlink(missing_ok=True)
            before_path = self.run_dir / "eval_before.json"
            if self.shared_evals_before is not None:
                report["evals_before"] = self.shared_evals_before
                before_path.write_text(json.dumps(self.shared_evals_before, indent=2))
                self.evals.record(self.shared_evals_before, "shared: same model, prompts and "
                                  "sampling seed as the run that measured it")
                self.console.print("before-training evaluation: reused (same model, prompts and "
                                   "sampling seed as the run that measured it)")
            elif self.resume and before_path.exists():
                report["evals_before"] = json.loads(before_path.read_text())
            else:
                report["evals_before"] = self.evals.run_all("before training", 0)
                if report["evals_before"]:
                    before_path.write_text(json.dumps(report["evals_before"], indent=2))
            t0 = time.perf_counter()
            self.start_trainer()
            code = self.supervise()
            self.evals.wait()
            report["train_seconds"] = time.perf_counter() - t0
            report["trainer_exit_code"] = code
            if code == EXIT_DISK_FULL:  # the trainer's line above names path, space, checkpoint
                raise LaunchError(f"the trainer stopped: disk full (see its line above). Free "
                                  f"space, then: {self.resume_command}")
            if code != 0:
                why = self.redis_problem()
                if why is not None and self.redis is not None:  # ours: the next run restarts it
                    raise LaunchError(f"lost Redis ({why}); the run stopped at its last "
                                      f"checkpoint. Continue with: {self.resume_command}")
                if why is not None:
                    raise LaunchError(f"lost Redis at {redact_url(self.redis_url)} ({why}); the run stopped at "
                                      f"its last checkpoint. Once Redis is back: {self.resume_command}")
                if code == STALLED:
                    raise LaunchError(f"the run stalled: no training step for "
                                      f"{self.run.stall_stop_s:.0f} s (run.stall_stop_s; the "
                                      f"diagnosis is above). Continue with: {self.resume_command}")
                raise LaunchError(f"the trainer exited with code {code}; see the messages above. "
                                  f"Continue with: {self.resume_command}")
            report["evals_after"] = self.evals.run_all("after training",
                                                       self.cfg["trainer"].total_steps)
            # The first set's results, under the names the experiment table reads.
            first = self.eval_sets[0].name if self.eval_sets else None
            report["eval_before"] = report["evals_before"].get(first)
            report["eval_after"] = report["evals_after"].get(first)
        except EvalError as e:  # a user's bug met by the evaluation: one line, not a traceback
            raise LaunchError(f"evaluation: {e}") from None
        except KeyboardInterrupt:
            self.console.print("[yellow]interrupted: stopping the trainer, the services and "
                               "Redis[/]")
            raise
        finally:
            self.stop_all()
        from rlrt.report import write_report

        write_report(self.run_dir, self.cfg["trainer"], report, console=self.console)
        return report
