#!/usr/bin/env python3
"""Run an inference server (SGLang or vLLM) and the rlrt worker that drives it, in one container.

    rlrt-with-engine --engine 'python3 -m sglang.launch_server ...' \
        --health http://127.0.0.1:30000/health -- rlrt serve rollout --config /etc/rlrt/run.yaml

1. Start the engine command (through `sh -c`, so `$VARS` expand) in its own process group.
2. Wait until its health URL answers 200 (or fail: the engine exited, or --start-timeout passed).
3. Start the worker command (the arguments after `--`).
   It gets RLRT_ENGINE_NCCL_VERSION: the nvidia-nccl wheel of this Python environment, which
   is the engine's (this script runs under the image's python3, as the engine does). The
   worker reports it (GET /v1/version), so the trainer compares NCCL versions before an NCCL
   group forms, also for SGLang, whose server does not say.
4. Whichever exits first, the other is stopped: the container lives exactly as long as both do,
   so Docker's restart policy or Kubernetes restarts the pair together. The exit code is the
   first one to exit's (a non-zero code if the engine died under a running worker).
5. SIGTERM/SIGINT: the worker is stopped first (it finishes in-flight messages), then the engine.

Standard library only: it runs in the engines' own images, before and beside any project code.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

# services/engines/nccl_sync.py reads it (tests/test_deploy_images.py checks the two agree).
ENGINE_NCCL_ENV = "RLRT_ENGINE_NCCL_VERSION"


def engine_nccl() -> str | None:
    """The NCCL wheel torch pins in this environment (nvidia-nccl-cu13 or -cu12), or None."""
    from importlib import metadata

    for dist in ("nvidia-nccl-cu13", "nvidia-nccl-cu12"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def log(msg: str) -> None:
    print(f"[rlrt-with-engine] {msg}", file=sys.stderr, flush=True)


def healthy(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 - loopback URL
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def stop(proc: subprocess.Popen | None, name: str, grace_s: float) -> None:
    """SIGTERM the process group, SIGKILL it after `grace_s`."""
    if proc is None or proc.poll() is not None:
        return
    log(f"stopping {name} (pid {proc.pid})")
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        log(f"{name} did not stop within {grace_s:.0f}s: SIGKILL")
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rlrt-with-engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", default=os.environ.get("RLRT_ENGINE_CMD"),
                   help="engine server command line, run with sh -c (default: $RLRT_ENGINE_CMD)")
    p.add_argument("--health", default=os.environ.get("RLRT_ENGINE_HEALTH"),
                   help="URL that answers 200 once the engine serves (default: $RLRT_ENGINE_HEALTH)")
    p.add_argument("--start-timeout", type=float,
                   default=float(os.environ.get("RLRT_ENGINE_START_TIMEOUT", "1800")),
                   help="seconds to wait for the engine's first 200 (model download + load)")
    p.add_argument("--grace", type=float, default=float(os.environ.get("RLRT_STOP_GRACE", "30")),
                   help="seconds each process gets to stop after SIGTERM")
    p.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("worker", nargs=argparse.REMAINDER, help="-- then the worker command")
    ns = p.parse_args(argv)
    if ns.worker and ns.worker[0] == "--":
        ns.worker = ns.worker[1:]
    if not ns.engine or not ns.health or not ns.worker:
        p.error("need --engine, --health and a worker command after --")
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse(sys.argv[1:] if argv is None else argv)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        log(f"got signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    log(f"starting engine: {ns.engine}")
    engine = subprocess.Popen(["sh", "-c", ns.engine], start_new_session=True)
    worker: subprocess.Popen | None = None
    deadline = time.monotonic() + ns.start_timeout
    try:
        while not healthy(ns.health):
            if stopping:
                return 143
            if engine.poll() is not None:
                log(f"engine exited with code {engine.returncode} before it was healthy")
                return engine.returncode or 1
            if time.monotonic() > deadline:
                log(f"engine not healthy at {ns.health} after {ns.start_timeout:.0f}s")
                return 1
            time.sleep(ns.poll)
        log(f"engine healthy at {ns.health}; starting worker: {' '.join(ns.worker)}")
        env = dict(os.environ)
        nccl = engine_nccl()
        if nccl:
            env.setdefault(ENGINE_NCCL_ENV, nccl)
        worker = subprocess.Popen(ns.worker, start_new_session=True, env=env)
        while not stopping:
            if worker.poll() is not None:
                log(f"worker exited with code {worker.returncode}")
                return worker.returncode
            if engine.poll() is not None:
                log(f"engine exited with code {engine.returncode} under a running worker")
                return engine.returncode or 1
            time.sleep(ns.poll)
        return 143 if worker.poll() is None else worker.returncode
    finally:
        stop(worker, "worker", ns.grace)
        stop(engine, "engine", ns.grace)


if __name__ == "__main__":
    sys.exit(main())
