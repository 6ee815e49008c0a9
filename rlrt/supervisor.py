"""The processes of a local run, kept alive: Redis, the services, their vLLM servers, the trainer.

A service that dies is named, restarted and brought to the newest weights; the embedded Redis
is restarted on its AOF directory (every process reconnects); if either keeps failing, the
trainer is stopped the one way it is ever stopped (rlrt/trainer_stop.py: it finishes its step
and checkpoints) and the run can be continued with `--resume`. The stall watch names the part
that stopped moving when no training step completes for `run.stall_warn_s`, and with
`run.stall_stop_s` stops the run resumably.

The supervisor knows nothing of evaluation: `supervise(on_tick)` calls back with the steps
done, and rlrt/train.py decides what to do with them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import redis
from rich.console import Console

from protocol.messages import WeightUpdate
from protocol.topology import stage, trainer_input
from protocol.weights_client import WeightsClient, newest_weights
from rlrt.disk_space import disk_full_at, disk_full_line, disk_paths
from rlrt.engine_servers import EngineServerError, EngineServers
from rlrt.eval_runner import steps_done
from rlrt.launch import LaunchError
from rlrt.plan import ProcSpec, RunPlan
from rlrt.processes import Child
from rlrt.redis_server import AofDamaged, EmbeddedRedis, RedisDirBusy
from rlrt.repush import repush
from rlrt.trainer_stop import stop_trainer

if TYPE_CHECKING:
    from rlrt.run_config import RunSettings

# supervise()'s return codes when it stopped the trainer itself (not the trainer's own code)
STALLED = -1000
GAVE_UP = 3  # a service or Redis could not be restarted


@dataclass
class StallWatch:
    """The stall clock. It starts at this run's first completed step: start-up and the first
    step (model load, engine init) may take long, and the trainer's own wait_timeout_s bounds
    them. `tick` says "warn" every `warn_s` without a step and "stop" after `stop_s`."""

    warn_s: float
    stop_s: float | None
    step: int = -1
    since: float = 0.0
    warned: int = 0
    watching: bool = False

    def tick(self, step: int, now: float) -> str | None:
        if step != self.step:
            first = self.step == -1
            self.step, self.since, self.warned = step, now, 0
            self.watching = self.watching or not first
            return None
        if not self.watching:
            return None
        if self.stop_s is not None and now - self.since >= self.stop_s:
            return "stop"
        if now - self.since >= self.warn_s * (self.warned + 1):
            self.warned += 1
            return "warn"
        return None


def diagnose(services: Mapping[str, tuple[int | str, int | None, str]],
             trainer_waiting: int | str) -> str:
    """One line for a stalled run. `services`: per service, (entries its group has read but
    not acked, its /readyz status or None, how to show that answer); `trainer_waiting`: groups
    in the trainer's input stream not yet consumed. When every service is ready with nothing
    in flight, the part not progressing is the trainer: the line starts by naming it."""
    parts = [f"{name}: {held} in flight, {ready}" for name, (held, _, ready) in services.items()]
    idle = all(held == 0 and status == 200 for held, status, _ in services.values())
    line = "; ".join(parts)
    if idle:
        return (f"the trainer is not progressing (every service is ready with nothing in flight; "
                f"{trainer_waiting} groups wait in its input stream; its own output above says "
                f"what it is doing); {line}")
    return line


def claim_redis_dir(server: EmbeddedRedis) -> None:
    """Refuse a Redis directory another redis-server still serves (a killed run's)."""
    try:
        server.claim()
    except RedisDirBusy as e:
        raise LaunchError(f"{e} (is this run still running, e.g. a killed launcher's "
                          "trainer finishing its step?)") from None


def own_redis(redis_url: str | None, run_dir: Path, run: RunSettings) -> EmbeddedRedis | None:
    """The run's embedded Redis (in its run directory, with `run`'s settings for it), or None
    when `redis_url` (bus.redis_url) names the user's own."""
    return None if redis_url else EmbeddedRedis(run_dir / "redis",
                                                aof_rewrite_min_mb=run.redis_aof_rewrite_mb)


class Supervisor:
    """The processes of one `RunPlan` (see the module docstring)."""

    def __init__(self, plan: RunPlan, *, console: Console, redis: EmbeddedRedis | None,
                 engine_servers: EngineServers | None = None) -> None:
        self.plan = plan
        self.console = console
        self.log: Callable[[str], None] = console.print
        self.run = plan.cfg["run"]
        self.redis = redis  # ours (see own_redis); None: the user's, at bus.redis_url
        self.redis_url: str | None = plan.cfg["bus"].redis_url
        self.engine_servers = engine_servers
        self.children: dict[str, Child] = {}
        self.trainer: Child | None = None
        self.stopping = False

    # ------------------------------------------------------------------ starting
    def start_redis(self) -> None:
        if self.redis is None:
            return
        claim_redis_dir(self.redis)
        try:
            self.redis_url = self.redis.start()
        except AofDamaged as e:
            raise LaunchError(f"{e}. Then: {self.plan.resume_command}") from None
        except RuntimeError as e:
            raise self._start_failed(e) from None
        self.log(f"[dim]redis: {self.redis_url}[/]")

    def _child(self, spec: ProcSpec) -> Child:
        return Child(spec.name, spec.argv, spec.env, log_path=spec.log_path, ready_url=spec.ready_url)

    def start_services(self) -> None:
        if self.engine_servers:
            try:
                self.engine_servers.start()
            except EngineServerError as e:
                raise LaunchError(str(e)) from None
        for name in self.plan.services:
            self.children[name] = self._child(self.plan.service(name, self.redis_url))
            self.children[name].start()
        for name in self.plan.services:
            with self.console.status(f"waiting for {name} ..."):
                try:
                    self.children[name].wait_ready(self.run.start_timeout_s)
                except RuntimeError as e:
                    raise self._start_failed(e) from None
            self.log(f"[green]{name}[/] ready at {self.plan.url(name)}")

    def _start_failed(self, e: RuntimeError) -> LaunchError:
        """A part that died while starting: a full disk is the cause to name (the part had no
        room to say so in its log), else what it said."""
        full = disk_full_at(disk_paths(self.plan))
        return LaunchError(disk_full_line(self.plan, full) if full else str(e))

    def start_trainer(self) -> Child:
        self.trainer = self._child(self.plan.trainer(self.redis_url))
        self.trainer.start()
        return self.trainer

    # ------------------------------------------------------------------ reviving
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
            self.log(f"[red]redis died (exit {code}) {self.redis.restarts + 1} times; giving up[/]")
            return False
        self.log(f"[yellow]redis died (exit {code}); restarting it on {self.redis.directory}[/] "
                 f"(log: {self.redis.directory / 'redis.log'})")
        try:
            self.redis.restart()
        except RuntimeError as e:
            self.log(f"[red]redis did not come back: {e}[/]")
            return False
        self.log("redis back; the services and the trainer reconnect")
        return True

    def latest_weights(self) -> WeightUpdate | None:
        """The newest weight directory the trainer published (for a restarted service)."""
        return newest_weights(self.plan.weights_root, "launcher")

    def weights_client(self, name: str) -> WeightsClient:
        return WeightsClient(name, self.plan.url(name), self.plan.token)

    def revive(self, name: str) -> bool:
        child = self.children[name]
        code = child.proc.returncode if child.proc else None
        if child.restarts >= self.run.max_restarts:
            self.log(f"[red]{name} died (exit {code}) {child.restarts + 1} times; giving up[/]")
            return False
        self.log(f"[yellow]{name} died (exit {code}); restarting[/] (log: {child.log_path})")
        child.restarts += 1
        try:
            child.start()
            child.wait_ready(self.run.start_timeout_s)
        except (RuntimeError, OSError) as e:
            # A service cannot come back while Redis is down (its readiness needs Redis): say
            # which, instead of a traceback.
            why = self.redis_problem()
            self.log(f"[red]{name} did not come back"
                     + (f": Redis is unreachable ({why})" if why else f": {e}") + "[/]")
            return False
        if stage(name).runs_engine:
            self.log(repush(self.weights_client(name), self.latest_weights()))
        return True

    # ------------------------------------------------------------------ watching
    def stop_trainer(self) -> None:
        """The trainer's one way to stop (rlrt/trainer_stop.py): it finishes its step and
        checkpoints; the line says what was saved."""
        if self.trainer is None:
            return
        if self.trainer.alive:
            self.log(stop_trainer(self.trainer, metrics_jsonl=self.plan.metrics_path,
                                  checkpoint_root=self.plan.checkpoint_root, log=self.log))
        else:
            self.trainer.stop(timeout_s=0)  # closes its log

    def _give_up(self) -> int:
        self.log("[red]stopping the trainer; continue later with --resume[/]")
        self.stop_trainer()
        return GAVE_UP

    def supervise(self, on_tick: Callable[[int], None] | None = None, poll_s: float = 0.5) -> int:
        """Wait for the trainer; keep the services alive meanwhile. Returns its exit code, or
        STALLED / GAVE_UP when the supervisor stopped it."""
        assert self.trainer is not None and self.trainer.proc is not None
        watch = StallWatch(self.run.stall_warn_s, self.run.stall_stop_s)
        while self.trainer.proc.poll() is None:
            step = steps_done(self.plan.metrics_path)
            verdict = None if self.stopping else watch.tick(step, time.monotonic())
            if verdict is not None:
                quiet = time.monotonic() - watch.since
                if verdict == "warn":
                    self.log(f"[yellow]no training step for {quiet:.0f} s (after step {step}): "
                             f"{self.pipeline_state()}[/]")
                else:
                    self.log(f"[red]no training step for {quiet:.0f} s (run.stall_stop_s): "
                             f"{self.pipeline_state()}; stopping the trainer; continue later "
                             "with --resume[/]")
                    self.stop_trainer()
                    return STALLED
            if self.redis is not None and not self.redis.alive and not self.stopping \
                    and not self.revive_redis():
                return self._give_up()
            for name, child in self.children.items():
                if not child.alive and not self.stopping and not self.revive(name):
                    return self._give_up()
            for owner in self.engine_servers.dead() if self.engine_servers else []:
                if not self.stopping and not self.engine_servers.revive(  # type: ignore[union-attr]
                        owner, self.run.max_restarts, self.plan.url, self.plan.token,
                        self.latest_weights()):
                    return self._give_up()
            if on_tick is not None:
                on_tick(step)
            time.sleep(poll_s)
        return self.trainer.proc.returncode

    def pipeline_state(self) -> str:
        """One line for a stalled run (see `diagnose`): per service, the entries its group has
        read but not acked and its /readyz answer (or why there was none); the groups waiting
        for the trainer."""
        from protocol.bus import Bus

        bus_cfg = self.plan.cfg["bus"]

        async def pending() -> tuple[dict[str, int | str], int | str]:
            bus = Bus.from_url(self.redis_url, bus_cfg)
            out: dict[str, int | str] = {}
            try:
                for name in self.children:
                    try:
                        out[name] = await asyncio.wait_for(
                            bus.pending(bus_cfg.stream(stage(name).in_stream), stage(name).group), 2)
                    except Exception as e:  # noqa: BLE001 - a diagnosis, never a crash
                        out[name] = f"? ({type(e).__name__})"
                try:  # acked entries are deleted: what is left is unread or in the trainer's hands
                    waiting: int | str = await asyncio.wait_for(bus.backlog(bus_cfg.stream(
                        trainer_input(self.plan.cfg["trainer"].teacher_service)[0])), 2)
                except Exception as e:  # noqa: BLE001
                    waiting = f"? ({type(e).__name__})"
            finally:
                await bus.close()
            return out, waiting

        try:
            held, waiting = asyncio.run(pending())
        except Exception as e:  # noqa: BLE001
            held, waiting = {name: f"? ({type(e).__name__}: {e})" for name in self.children}, "?"
        states: dict[str, tuple[int | str, int | None, str]] = {}
        for name in self.children:
            try:
                r = httpx.get(self.plan.url(name) + "/readyz", timeout=2)
                states[name] = (held.get(name, "?"), r.status_code,
                                f"/readyz {r.status_code} {r.text.strip()[:160]}")
            except httpx.HTTPError as e:
                states[name] = (held.get(name, "?"), None, f"/readyz no answer ({type(e).__name__})")
        return diagnose(states, waiting)

    # ------------------------------------------------------------------ stopping
    def stop_all(self) -> None:
        """Stop everything in order (trainer first: its checkpoint), leaving no process."""
        self.stopping = True
        self.stop_trainer()
        for child in reversed(list(self.children.values())):
            child.stop(timeout_s=30)
        if self.engine_servers:
            self.engine_servers.stop()
        if self.redis is not None:
            self.redis.stop()
