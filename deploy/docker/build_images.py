#!/usr/bin/env python3
"""Build images with BuildKit where `docker compose build` cannot (Debian's docker.io has no
buildx, and Compose then falls back to the classic builder, which rejects `RUN --mount` and
`COPY --chmod`). The build arguments come from the compose file itself, resolved by Compose,
so this script adds no second list of them.

    python3 deploy/docker/build_images.py --profile cpu          # every image of the profile
    python3 deploy/docker/build_images.py -f X.Dockerfile -t NAME [--build-arg K=V ...] CONTEXT

Prints one JSON line per image built: {"image", "seconds"} (docs/deploy.md's build times).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _client_version(docker: str) -> tuple[int, ...]:
    out = subprocess.run([docker, "version", "--format", "{{.Client.Version}}"],
                         capture_output=True, text=True, timeout=30, check=False)
    digits = out.stdout.strip().split("+")[0].split("-")[0].split(".")
    return tuple(int(d) for d in digits if d.isdigit())


def buildkit_cli() -> str:
    """A docker CLI that builds with BuildKit: one with the buildx plugin, else a pre-23 CLI
    (Debian's docker.io 20.10), whose `build` drives the daemon's BuildKit itself under
    DOCKER_BUILDKIT=1. Newer CLIs without buildx refuse DOCKER_BUILDKIT=1."""
    candidates = [c for c in (shutil.which("docker"), "/usr/bin/docker") if c and Path(c).exists()]
    for docker in candidates:
        ok = subprocess.run([docker, "buildx", "version"], capture_output=True, timeout=30,
                            check=False).returncode == 0
        if ok or _client_version(docker) < (23,):
            return docker
    raise SystemExit("no docker CLI here builds with BuildKit: install the buildx plugin")


def build(dockerfile: str, tag: str, context: str, args: dict[str, str]) -> float:
    cmd = [buildkit_cli(), "build", "-f", dockerfile, "-t", tag]
    for key, value in args.items():
        cmd += ["--build-arg", f"{key}={value}"]
    start = time.monotonic()
    subprocess.run([*cmd, context], check=True, env={**os.environ, "DOCKER_BUILDKIT": "1"})
    return time.monotonic() - start


def compose_builds(compose: list[str], profile: str) -> list[tuple[str, str, str, dict[str, str]]]:
    """(dockerfile, image, context, args) of each service of the profile that has a build."""
    out = subprocess.run([*compose, "--profile", profile, "config", "--format", "json"],
                         capture_output=True, text=True, timeout=120, check=True)
    seen, builds = set(), []
    for svc in json.loads(out.stdout)["services"].values():
        b = svc.get("build")
        if not b or svc["image"] in seen:
            continue
        seen.add(svc["image"])
        context = b.get("context", ".")
        builds.append((str(Path(context) / b["dockerfile"]), svc["image"], context,
                       {k: v for k, v in (b.get("args") or {}).items() if v is not None}))
    return builds


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", help="build every image of this compose profile")
    p.add_argument("--compose", default="docker compose", help="the Compose command")
    p.add_argument("-f", "--file", help="one Dockerfile")
    p.add_argument("-t", "--tag")
    p.add_argument("--build-arg", action="append", default=[])
    p.add_argument("context", nargs="?", default=".")
    a = p.parse_args(argv)
    if a.profile:
        jobs = compose_builds(a.compose.split(), a.profile)
    elif a.file and a.tag:
        jobs = [(a.file, a.tag, a.context, dict(kv.split("=", 1) for kv in a.build_arg))]
    else:
        p.error("--profile, or -f and -t")
    for dockerfile, image, context, args in jobs:
        seconds = build(dockerfile, image, context, args)
        print(json.dumps({"image": image, "seconds": round(seconds, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
