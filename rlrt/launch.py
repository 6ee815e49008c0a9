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
import hashlib
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

from protocol.config import ConfigError
from protocol.redis_server import EmbeddedRedis, RedisDirBusy
from rlrt.processes import Child, free_port, port_free, rlrt_argv
from rlrt.sections import load_all

SERVICES = ("verifier", "rollout", "teacher")


class LaunchError(RuntimeError):
    """A problem found before or while starting the run: one line for the user."""


class LocalRun:
    def __init__(self, config_path: str | Path, *, resume: bool = False,
                 services: tuple[str, ...] = SERVICES, console: Console | None = None) -> None:
        self.config_path = Path(config_path).resolve()
        self.resume = resume
        self.services = services
        self.console = console or Console(stderr=True)
        try:
            self.cfg: dict[str, Any] = load_all(str(self.config_path))
        except ConfigError as e:
            raise LaunchError(str(e)) from None
        self.run = self.cfg["run"]
        self.run_dir = Path(self.run.dir).resolve()
        self.token = self.run.control_token or secrets.token_hex(16)
        self.redis: EmbeddedRedis | None = None
        self.redis_url: str | None = self.cfg["bus"].redis_url
        self.children: dict[str, Child] = {}
        self.ports: dict[str, int] = {}
        self.trainer: Child | None = None
        self._stopping = False

    # ------------------------------------------------------------------ preflight
    @property
    def model_path(self) -> Path:
        return Path(self.cfg["trainer"].model_path).resolve()

    def preflight(self) -> None:
        """Everything that can be checked before a process starts; one clear error each."""
        for name in self.services:
            c = self.cfg[name]
            port = c.port or free_port(c.host)
            if not port_free(c.host, port):
                raise LaunchError(f"{name}: port {port} on {c.host} is already taken "
                                  f"(set {name}.port in the config, or 0 for any free port)")
            self.ports[name] = port
        if not self.model_path.exists() and not self.run.bootstrap:
            raise LaunchError(f"model directory {self.model_path} does not exist "
                              "(run `rlrt bootstrap --out DIR`, or set run.bootstrap: true)")
        if self.model_path.exists() and not (self.model_path / "config.json").exists():
            raise LaunchError(f"{self.model_path} is not a Hugging Face model directory (no config.json)")
        if self.redis_url:
            try:
                redis.Redis.from_url(self.redis_url, socket_connect_timeout=3).ping()
            except (redis.RedisError, OSError) as e:
                raise LaunchError(f"Redis at {self.redis_url} is unreachable: {e}") from None

    # ------------------------------------------------------------------ processes
    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "REDIS_URL": self.redis_url or "",
            "RLRT_BUS__REDIS_URL": self.redis_url or "",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "DS_ACCELERATOR": env.get("DS_ACCELERATOR", "cpu"),
            "PYTHONUNBUFFERED": "1",
        })
        model = str(self.model_path)
        for name in self.services:
            up = name.upper()
            env[f"RLRT_{up}__PORT"] = str(self.ports[name])
            env[f"RLRT_{up}__TOKEN"] = self.token
            if name in ("rollout", "teacher") and self.cfg[name].engine.kind == "cpu" \
                    and not self.cfg[name].engine.model_path:
                env[f"RLRT_{up}__ENGINE__MODEL_PATH"] = model
        return env

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
        self.console.print(f"[dim]redis: {self.redis_url}[/]")

    @property
    def resume_command(self) -> str:
        return f"rlrt train --config {self.config_path} --resume"

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
        child = Child(name, rlrt_argv("serve", name, "--config", str(self.config_path)),
                      self.child_env(), log_path=self.run_dir / "logs" / f"{name}.log",
                      ready_url=f"{self.url(name)}/readyz")
        child.start()
        self.children[name] = child
        return child

    def start_services(self) -> None:
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
        services = [{"name": n, "url": self.url(n)} for n in self.services if n in ("rollout", "teacher")]
        env["RLRT_TRAINER__PUSH__SERVICES"] = json.dumps(services)
        env["RLRT_TRAINER__PUSH__CONTROL_TOKEN"] = self.token
        return env

    def start_trainer(self) -> Child:
        argv = rlrt_argv("run-trainer", "--config", str(self.config_path))
        if self.resume:
            argv.append("--resume")
        self.trainer = Child("trainer", argv, self.trainer_env(), log_path=None)
        self.trainer.start()
        return self.trainer

    # ------------------------------------------------------------------ supervision
    def latest_weights(self) -> dict | None:
        """The newest weight directory the trainer published (for a restarted service)."""
        root = self.cfg["trainer"].weights_root
        root = root if root.is_absolute() else Path.cwd() / root
        best = None
        for manifest in root.glob("*/manifest.json"):
            try:
                raw = manifest.read_bytes()
                version = int(json.loads(raw).get("version", -1))
            except (OSError, ValueError):
                continue
            if best is None or version > best[0]:
                # The directory's digest is the sha256 of its manifest (protocol/weights.py).
                best = (version, manifest.parent, hashlib.sha256(raw).hexdigest())
        if best is None:
            return None
        return {"version": best[0], "location": str(best[1]), "sha256": best[2],
                "format": "safetensors_dir", "run_id": "launcher"}

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
                r = httpx.post(f"{self.url(name)}/v1/weights", json=update, timeout=300,
                               headers={"Authorization": f"Bearer {self.token}"})
                self.console.print(f"{name} back at weights version {update['version']} "
                                   f"({r.status_code})")
            except httpx.HTTPError as e:  # the trainer's next push brings it up to date
                self.console.print(f"[yellow]{name} back, weights not pushed yet: {e!r}[/]")
        return True

    def supervise(self) -> int:
        """Wait for the trainer; keep the services alive meanwhile. Returns its exit code."""
        assert self.trainer is not None and self.trainer.proc is not None
        while self.trainer.proc.poll() is None:
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
            time.sleep(0.5)
        return self.trainer.proc.returncode

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, label: str, *, data: str = "countdown", n: int | None = None,
                 k: int | None = None, temperature: float | None = None, top_p: float | None = None,
                 max_new_tokens: int | None = None, task: str = "math") -> dict | None:
        if "rollout" not in self.children or "verifier" not in self.children:
            return None
        from transformers import AutoTokenizer

        from protocol.bus import Bus
        from protocol.messages import SamplingParams
        from rlrt.evaluate import evaluate, load_items

        trainer = self.cfg["trainer"]
        knobs = dict(getattr(trainer.data, "countdown_knobs", {}) or {})
        items = load_items(data, n=n if n is not None else self.run.eval_prompts,
                           seed=self.run.seed + 7, countdown_knobs=knobs, task=task)
        if not items:
            return None
        k = k or self.run.eval_k
        tok = AutoTokenizer.from_pretrained(str(self.model_path))
        sampling = SamplingParams(
            temperature=self.run.eval_temperature if temperature is None else temperature,
            top_p=self.run.eval_top_p if top_p is None else top_p,
            max_new_tokens=max_new_tokens or self.run.eval_max_new_tokens)

        async def go() -> dict:
            bus = Bus.from_url(self.redis_url, self.cfg["bus"])
            try:
                return await evaluate(items, tokenizer=tok, bus=bus,
                                      prompts_stream=self.cfg["bus"].stream(self.cfg["rollout"].in_stream),
                                      verifier_url=self.url("verifier"), token=self.token,
                                      k=k, sampling=sampling, seed=self.run.seed)
            finally:
                await bus.close()

        with self.console.status(f"held-out evaluation ({label}) ..."):
            res = asyncio.run(go())
        self.console.print(f"held-out {label}: avg@{k} {res[f'avg@{k}']:.3f}  pass@{k} {res[f'pass@{k}']:.3f}")
        return res

    def evaluate_once(self, data: str, **kw: Any) -> dict:
        """`rlrt eval`: start Redis + rollout + verifier, evaluate, stop."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.preflight()
        if not self.model_path.exists():
            raise LaunchError(f"model directory {self.model_path} does not exist")
        try:
            self.start_redis()
            self.start_services()
            res = self.evaluate("eval", data=data, **kw)
        finally:
            self.stop_all()
        if res is None:
            raise LaunchError(f"no evaluation items in {data}")
        return res

    # ------------------------------------------------------------------ whole run
    def bootstrap_if_needed(self) -> None:
        if self.model_path.exists():
            return
        from trainer.bootstrap.run import bootstrap

        self.console.print(f"no model at {self.model_path}: bootstrapping the tiny Countdown model")
        bootstrap(self.model_path, seed=self.run.seed, steps=self.run.bootstrap_steps,
                  log=lambda m: self.console.print(f"[dim]{m}[/]"))

    def stop_all(self) -> None:
        self._stopping = True
        if self.trainer is not None:
            self.trainer.stop(timeout_s=120)
        for child in reversed(list(self.children.values())):
            child.stop(timeout_s=30)
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
            before_path = self.run_dir / "eval_before.json"
            if self.resume and before_path.exists():
                report["eval_before"] = json.loads(before_path.read_text())
            else:
                report["eval_before"] = (self.evaluate("before training")
                                         if self.run.eval_prompts > 0 else None)
                if report["eval_before"]:
                    before_path.write_text(json.dumps(report["eval_before"], indent=2))
            t0 = time.perf_counter()
            self.start_trainer()
            code = self.supervise()
            report["train_seconds"] = time.perf_counter() - t0
            report["trainer_exit_code"] = code
            if code != 0:
                why = self.redis_problem()
                if why is not None:
                    raise LaunchError(f"lost Redis at {self.redis_url} ({why}); the run stopped at "
                                      f"its last checkpoint. Once Redis is back: {self.resume_command}")
                raise LaunchError(f"the trainer exited with code {code}; see the messages above. "
                                  f"Continue with: {self.resume_command}")
            report["eval_after"] = (self.evaluate("after training")
                                    if self.run.eval_prompts > 0 else None)
        except KeyboardInterrupt:
            self.console.print("[yellow]interrupted: stopping the trainer (it checkpoints), the "
                               "services and Redis[/]")
            raise
        finally:
            self.stop_all()
        from rlrt.report import write_report

        write_report(self.run_dir, self.cfg["trainer"], report, console=self.console)
        return report
