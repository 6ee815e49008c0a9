"""Drift: what docker-compose.yml and the Kubernetes overlays run must be what the code accepts.

Every container of every deployment (compose resolved by Docker Compose, each overlay
rendered by kustomize) is taken as the runtime would start it (image entrypoint + command)
and checked against the real code:
- its command line parses with the real parsers: the `rlrt` Typer app (rlrt.cli), torchrun's
  own argument parser, and the engine supervisor's;
- every RLRT_<SECTION>__<FIELD> variable names a field of that section's model
  (rlrt.config), every other RLRT_* variable is one our images' scripts read;
- the mounted config loads through every section model with that container's environment;
- ports and probes: --port is the stage's default port (protocol/topology.py, which the config
  model's default reads), probes hit that port on the stage's health routes, which the
  service's app serves, and the trainer's push targets, engine URLs, GPU counts, Redis
  URL and weight-sync address agree with the services they name.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from urllib.parse import urlparse

import pytest
import typer
from support.deploy import (
    CONFIG_MOUNT,
    DOCKER,
    OVERLAYS,
    ROOT,
    Unit,
    compose_binary,
    compose_config,
    compose_project,
    compose_units,
    k8s_tree,
    k8s_units,
    kustomize_binary,
    render,
)

from protocol.topology import ENGINE_STAGES, HEALTH_ROUTES, METRICS_ROUTE, SERVICES, STAGES
from rlrt.config import SECTION_MODELS as SECTIONS

SERVICE_SECTIONS = SERVICES
# RLRT_* variables that are no config field: read by deploy/docker's scripts and images.
SCRIPT_VARS = {"RLRT_MODEL", "RLRT_ENGINE_CMD", "RLRT_ENGINE_HEALTH", "RLRT_ENGINE_PORT",
               "RLRT_ENGINE_HOST", "RLRT_ENGINE_TP", "RLRT_ENGINE_DP", "RLRT_ENGINE_ARGS",
               "RLRT_ENGINE_START_TIMEOUT", "RLRT_STOP_GRACE", "RLRT_HEALTH_URLS",
               "RLRT_ENGINE_API_KEY"}


def model(section: str):
    """The section's model (an import error fails the test: it is a real break)."""
    module, _, attr = SECTIONS[section].partition(":")
    return getattr(importlib.import_module(module), attr)


# --------------------------------------------------------------------------- the deployments


@pytest.fixture(scope="module")
def deployments(tmp_path_factory) -> dict[str, list[Unit]]:
    out: dict[str, list[Unit]] = {}
    binary = compose_binary()
    if binary is not None:
        project = compose_project(tmp_path_factory.mktemp("compose"))
        for profile in ("gpu", "cpu", "cpu-single"):
            units = compose_units(compose_config(binary, project, profile), project.parent)
            out[f"compose/{profile}"] = units
    kz = kustomize_binary()
    if kz is not None:
        tree = k8s_tree(tmp_path_factory.mktemp("k8s"))
        for overlay in OVERLAYS:
            docs = render(kz, tree / "overlays" / overlay)
            out[f"k8s/{overlay}"] = k8s_units(docs, overlay, tree)
            out[f"k8s/{overlay}"][0].raw["docs"] = docs
    if not out:
        pytest.skip("neither docker-compose nor kustomize/kubectl is installed")
    return out


def ours(deployments) -> list[Unit]:
    return [u for units in deployments.values() for u in units if u.kind]


def units_of(deployments, kind: str) -> list[tuple[str, Unit]]:
    return [(d, u) for d, units in deployments.items() for u in units if u.kind == kind]


def test_every_deployment_was_read(deployments):
    assert {"compose/gpu", "compose/cpu", *(f"k8s/{o}" for o in OVERLAYS)} <= set(deployments)
    for name in ("compose/gpu", "compose/cpu", *(f"k8s/{o}" for o in OVERLAYS)):
        assert {u.kind for u in deployments[name]} >= set(STAGES), name


# --------------------------------------------------------------------------- command lines


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), DOCKER / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rlrt_argv(unit: Unit) -> list[str]:
    """The `rlrt ...` arguments this container runs, unwrapping the supervisor and torchrun
    with their own parsers."""
    argv = list(unit.argv)
    if argv[:1] == ["rlrt-with-engine"]:
        sup = _load_script("with_engine.py")
        saved = {k: os.environ.get(k) for k in ("RLRT_ENGINE_CMD", "RLRT_ENGINE_HEALTH")}
        os.environ.update({k: unit.env[k] for k in saved})
        try:
            ns = sup.parse(argv[1:])
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        assert ns.engine and ns.health.startswith("http://127.0.0.1:"), unit
        argv = ns.worker
    if argv[:1] == ["torchrun"]:
        from torch.distributed.run import get_args_parser

        ns = get_args_parser().parse_args(argv[1:])
        assert ns.module and ns.training_script == "rlrt.cli", f"{unit}: torchrun runs {ns.training_script}"
        unit.raw["torchrun"] = ns
        return list(ns.training_script_args)
    assert argv[:1] == ["rlrt"], f"{unit}: runs {argv[:2]}, not the rlrt CLI"
    return argv[1:]


def parse_cli(args: list[str]) -> tuple[list[str], dict]:
    """(command path, parsed params) through the real Typer app: an unknown command or option,
    or a bad value, raises."""
    from rlrt.cli import app

    cmd = typer.main.get_command(app)  # Typer's (vendored) click: not `click` classes
    path = []
    while hasattr(cmd, "list_commands"):  # a group
        assert args, f"missing sub-command after {path}"
        name, args = args[0], args[1:]
        sub = cmd.get_command(cmd.make_context("rlrt", [], resilient_parsing=True), name)
        assert sub is not None, f"`rlrt {' '.join([*path, name])}` is not a command of rlrt.cli"
        cmd, path = sub, [*path, name]
    ctx = cmd.make_context(" ".join(["rlrt", *path]), list(args))
    return path, ctx.params


def test_parse_cli_rejects_unknown_options():
    with pytest.raises(Exception, match="No such option: --prot"):
        parse_cli(["serve", "verifier", "--config", "x", "--prot", "1"])
    with pytest.raises(Exception, match="valid integer"):
        parse_cli(["serve", "verifier", "--port", "not-a-port"])
    with pytest.raises(AssertionError, match="not a command"):
        parse_cli(["serve", "nonexistent"])
    assert parse_cli(["serve", "verifier", "--port", "9"]) == (["serve", "verifier"], {
        "config": None, "host": None, "port": 9, "sets": (), "print_config": False})


def test_commands_parse(deployments):
    seen = set()
    for unit in ours(deployments):
        path, params = parse_cli(rlrt_argv(unit))
        seen.add(" ".join(path))
        if path == ["bootstrap"]:  # the cpu profile's model, built where its config loads it
            from rlrt.config import load_all

            assert str(params["out"]) == load_all(str(unit.config)).model, unit
            continue
        assert str(params["config"]) == CONFIG_MOUNT, unit
        assert unit.config is not None and unit.config.is_file(), f"{unit}: {CONFIG_MOUNT} not mounted"
        if path[0] == "serve":
            assert path[1] == unit.kind, unit
            assert params["host"] == "0.0.0.0", f"{unit}: services bind loopback unless told otherwise"
    assert {"serve verifier", "serve rollout", "serve teacher", "run-trainer", "train"} <= seen


def test_trainer_resumes_and_uses_its_gpus(deployments):
    for dep, unit in units_of(deployments, "trainer"):
        path, params = parse_cli(rlrt_argv(unit))
        assert path == ["run-trainer"] and params["resume"], f"{unit}: a restart must resume"
        ns = unit.raw["torchrun"]
        if dep.startswith("k8s"):
            assert ns.nproc_per_node == str(unit.gpus), unit
            assert ns.nnodes == unit.env["NNODES"] and ns.node_rank == int(unit.env["NODE_RANK"])
        elif dep == "compose/cpu":  # the Indexed Job's path: one rank per container, 2 nodes
            assert ns.nnodes == "2" and ns.nproc_per_node == "1" and ns.master_addr == "trainer"
        else:
            assert ns.nproc_per_node == "gpu" and ns.standalone  # every reserved GPU, one node


def test_service_ports_are_config_defaults(deployments):
    for unit in ours(deployments):
        path, params = parse_cli(rlrt_argv(unit))
        if path[0] != "serve":
            continue
        default = STAGES[unit.kind].port
        assert model(unit.kind).model_fields["port"].default == default, unit.kind
        assert params["port"] == default, f"{unit}: --port {params['port']} but {unit.kind}'s port is {default}"
        assert unit.probes, f"{unit} has no probe"
        for port, _ in unit.probes:
            if port == int(unit.env.get("RLRT_ENGINE_PORT", -1)):
                continue  # compose also probes the engine server itself
            assert port == params["port"], f"{unit}: probe on {port}, service on {params['port']}"


def _routes(kind: str) -> set[str]:
    if kind == "verifier":
        from services.verifier.api import build_app
        from services.verifier.pool import VerifyPool

        app = build_app(model("verifier")(), VerifyPool(1))
    else:
        model(kind)
        from services.engines.control_api import EngineSlot
        from services.engines.service import build_service_app

        app = build_service_app(kind, EngineSlot(), None, token=None, max_body_bytes=1024)
    return {getattr(r, "path", None) for r in app.routes}


def test_probe_paths_exist_in_the_apps(deployments):
    routes = {k: _routes(k) for k in SERVICE_SECTIONS}
    for kind in SERVICE_SECTIONS:
        assert {*STAGES[kind].health, METRICS_ROUTE} <= routes[kind], kind
    assert set(HEALTH_ROUTES) <= routes["rollout"]
    for unit in ours(deployments):
        if unit.kind not in routes:
            continue
        for port, path in unit.probes:
            if port == int(unit.env.get("RLRT_ENGINE_PORT", -1)):
                assert path == "/health", unit  # SGLang's and vLLM's health endpoint
                continue
            assert path in routes[unit.kind], f"{unit}: probe {path} is not a route of {unit.kind}"


# --------------------------------------------------------------------------- environment


def _models_in(annotation) -> list:
    """The pydantic models a field holds: itself, or the members of a (discriminated) union."""
    import typing

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _models_in(a)]


def field_exists(section_model, parts: list[str]) -> bool:
    """Does RLRT_<SECTION>__A__B name a field? Through nested models and the members of a
    union (trainer.push is DiskPush | NcclPush: a field of either counts)."""
    if not parts:
        return True
    part, rest = parts[0].lower(), parts[1:]
    fields = {k.lower(): v for k, v in section_model.model_fields.items()}
    if part not in fields:
        return False
    if not rest:
        return True
    return any(field_exists(m, rest) for m in _models_in(fields[part].annotation))


def test_field_exists_walks_nested_models():
    trainer = model("trainer")
    assert field_exists(trainer, ["PUSH", "MASTER_ADDRESS"])
    assert field_exists(trainer, ["PUSH", "DISK_EVERY"])  # a knob of NcclPush only
    assert not field_exists(trainer, ["PUSH", "MASTER_ADRESS"])
    assert not field_exists(trainer, ["LR", "X"])


def test_env_vars_name_real_fields(deployments):
    pattern = re.compile(r"^RLRT_([A-Z]+)__(.+)$")
    for unit in ours(deployments):
        for var in unit.env:
            if not var.startswith("RLRT_"):
                continue
            m = pattern.match(var)
            if m is None:
                assert var in SCRIPT_VARS, f"{unit}: {var} is neither a config field nor a script variable"
                continue
            section = m.group(1).lower()
            assert section in SECTIONS, f"{unit}: {var}: no config section {section!r}"
            assert field_exists(model(section), m.group(2).split("__")), f"{unit}: {var} names no field"


def test_script_variables_are_read():
    text = "\n".join(p.read_text() for p in DOCKER.iterdir() if p.suffix in (".sh", ".py", ".Dockerfile")
                     or p.name.endswith(".Dockerfile"))
    for var in SCRIPT_VARS:
        assert re.search(rf"\$\{{?{var}\b|\"{var}\"", text), f"{var} is read by nothing in deploy/docker"


@pytest.fixture
def clean_env(monkeypatch):
    for var in list(os.environ):
        if var.startswith("RLRT_") or var == "REDIS_URL":
            monkeypatch.delenv(var)
    return monkeypatch


def load(unit: Unit, section: str, monkeypatch):
    """The section as this container reads it: its mounted config under its environment,
    through the loader its `rlrt` command uses (the shared `model` / `data` keys included)."""
    from rlrt.config import load_section

    with monkeypatch.context() as m:
        for k, v in unit.env.items():
            m.setenv(k, v)
        return load_section(section, str(unit.config))


def test_mounted_config_loads_with_each_containers_env(deployments, clean_env):
    checked = 0
    for unit in ours(deployments):
        for section in SECTIONS:
            load(unit, section, clean_env)  # ConfigError names the field
            checked += 1
    assert checked


# --------------------------------------------------------------------------- wiring


def _host_port(url: str) -> tuple[str, int]:
    u = urlparse(url)
    return u.hostname, u.port


def _service_names(dep: str, deployments) -> dict[str, Unit | None]:
    units = deployments[dep]
    if dep.startswith("compose"):  # a service's name, or a network alias it answers to
        return {name: u for u in units for name in
                (u.name, *((u.raw.get("networks") or {}).get("rlrt") or {}).get("aliases", []))}
    docs = units[0].raw["docs"]
    by_selector = {}
    for d in docs:
        if d["kind"] == "Service":
            sel = d["spec"].get("selector", {}).items()
            match = [u for u in units if sel and sel <= u.raw["object"]["spec"]["template"]["metadata"]["labels"].items()]
            by_selector[d["metadata"]["name"]] = match[0] if match else None
    return by_selector


def _service_ports(dep: str, deployments, name: str) -> set[int]:
    if dep.startswith("compose"):
        return set()  # every container port is reachable on the compose network
    docs = deployments[dep][0].raw["docs"]
    svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == name)
    return {p["port"] for p in svc["spec"]["ports"]}


def test_engine_servers_match_the_config(deployments, clean_env):
    for kind, engine in (("rollout", "sglang"), ("teacher", "vllm")):
        for _, unit in units_of(deployments, kind):
            cfg = load(unit, kind, clean_env)
            if "RLRT_ENGINE_PORT" not in unit.env:  # no server beside it: the built-in CPU engine
                assert cfg.engine.kind == "cpu" and unit.raw["image"].startswith("rlrt-cpu:"), unit
                continue
            assert cfg.engine.kind == engine or unit.deployment == "compose" and (
                unit.raw["profiles"] == ["cpu"] and engine == "vllm"), unit
            host, port = _host_port(cfg.engine.url)
            assert host == "127.0.0.1" and port == int(unit.env["RLRT_ENGINE_PORT"]), (
                f"{unit}: {kind}.engine.url {cfg.engine.url} but the server listens on "
                f"{unit.env['RLRT_ENGINE_PORT']}")
            assert cfg.engine.model_path == unit.env["RLRT_MODEL"], unit


def test_trainer_reaches_the_services_it_pushes_to(deployments, clean_env):
    for dep, trainer in units_of(deployments, "trainer"):
        cfg = load(trainer, "trainer", clean_env)
        names = _service_names(dep, deployments)
        assert {s.name for s in cfg.push.services} == set(ENGINE_STAGES)
        for s in cfg.push.services:
            host, port = _host_port(s.url)
            target = names.get(host)
            assert target is not None, f"{dep}: push to {s.url}: no service {host!r}"
            _, params = parse_cli(rlrt_argv(target))
            assert port == params["port"], f"{dep}: push to {s.url}, {host} serves on {params['port']}"
            ports = _service_ports(dep, deployments, host)
            assert not ports or port in ports, f"{dep}: Service {host} does not expose {port}"
            if cfg.push.mode == "nccl":
                # The trainer drives the NCCL update through the service's /v1/weights; the
                # service talks to its engine server locally. Only the GPU count must agree.
                world = int(target.env.get("RLRT_ENGINE_TP", 1)) * int(target.env.get("RLRT_ENGINE_DP", 1))
                assert s.engine_world_size == world == target.gpus, (
                    f"{dep}: {s.name}: engine_world_size {s.engine_world_size}, TPxDP {world}, "
                    f"GPUs {target.gpus}")
                # SGLang takes NCCL updates only with dp_size 1 (the service and the trainer
                # refuse otherwise): a data-parallel rollout pushes by disk
                if s.engine == "sglang":
                    assert int(target.env.get("RLRT_ENGINE_DP", 1)) == 1, (
                        f"{dep}: push.mode nccl to {s.name}, whose SGLang server runs "
                        f"RLRT_ENGINE_DP={target.env['RLRT_ENGINE_DP']}: use push.mode disk or "
                        "one server per replica")
        assert cfg.model_path == next(u for _, u in units_of({dep: deployments[dep]}, "teacher")).env["RLRT_MODEL"]
        # The engines join the weight-sync group at the trainer's rank 0.
        addr = cfg.push.master_address
        first = addr.split(".")[0]
        if dep == "compose/cpu":  # disk pushes on the CPU: no weight-sync group to join
            assert cfg.push.mode == "disk", dep
        elif dep.startswith("compose"):
            assert addr == trainer.name, f"{dep}: master_address {addr}"
        else:
            job, pod = trainer.raw["object"], trainer.raw["object"]["spec"]["template"]["spec"]
            assert addr == f"{job['metadata']['name']}-0.{pod['subdomain']}" and first.endswith("-0")
        rank0 = not (trainer.raw.get("healthcheck") or {}).get("disable")  # cpu-trainer-1: rank 1
        assert cfg.metrics.prometheus_port in [p for p, _ in trainer.probes] or dep.startswith("k8s") or not rank0


def test_redis_url_names_the_redis_service(deployments, clean_env):
    for dep, units in deployments.items():
        names = _service_names(dep, deployments)
        for unit in units:
            if not unit.kind:
                continue
            bus = load(unit, "bus", clean_env)
            host, port = _host_port(bus.redis_url)
            assert host in names and port == 6379, f"{unit}: REDIS_URL {bus.redis_url}"


def test_control_token_reaches_every_service_and_the_trainer(deployments, clean_env):
    for dep, units in deployments.items():
        if dep == "compose/cpu-single":  # `rlrt train` in one container: its own services
            continue
        tokens = set()
        for unit in units:
            if unit.kind in SERVICE_SECTIONS:
                tokens.add(load(unit, unit.kind, clean_env).token)
            elif unit.kind == "trainer":
                tokens.add(load(unit, "trainer", clean_env).push.control_token)
        assert len(tokens) == 1 and None not in tokens, f"{dep}: tokens {tokens}"


# --------------------------------------------------------------------------- config files


def test_k8s_base_config_is_the_paper_config():
    assert (ROOT / "deploy/k8s/base/run.yaml").read_text() == (ROOT / "configs/paper/rlrt.yaml").read_text()


def test_multi_node_config_differs_only_in_size(clean_env):
    from rlrt.config import load_section

    base = {s: load_section(s, str(ROOT / "configs/paper/rlrt.yaml")).model_dump() for s in SECTIONS}
    multi = {s: load_section(s, str(ROOT / "deploy/k8s/overlays/multi-node/run.yaml")).model_dump()
             for s in SECTIONS}
    base["trainer"]["push"]["services"] = [{**x, "engine_world_size": None} for x in base["trainer"]["push"]["services"]]
    multi["trainer"]["push"]["services"] = [{**x, "engine_world_size": None} for x in multi["trainer"]["push"]["services"]]
    for sec in ("trainer", "rollout"):
        for key in ("prompts_per_step", "concurrency"):
            base[sec].pop(key, None)
            multi[sec].pop(key, None)
    assert base == multi


def test_cpu_config_exists():
    path = ROOT / "configs" / "countdown-tiny.yaml"
    assert path.exists(), "configs/countdown-tiny.yaml (the CPU run config) is missing"
    from rlrt.config import load_all

    load_all(str(path))


def test_k8s_runs_what_compose_runs(deployments):
    """Kubernetes drift from what the compose test ran (tests/test_compose_cpu.py proves the
    compose wiring live): for each stage the same image, the same `rlrt` command, the same
    engine-script variables and the config and shared volume at the same paths."""
    compose = {u.kind: u for u in deployments["compose/gpu"] if u.kind in STAGES}
    for overlay in OVERLAYS:
        for unit in deployments[f"k8s/{overlay}"]:
            if unit.kind not in STAGES:
                continue
            twin = compose[unit.kind]
            image = unit.raw["container"]["image"].rsplit("/", 1)[-1].split(":")[0]
            assert image == twin.raw["image"].split(":")[0], unit
            assert rlrt_argv(unit) == rlrt_argv(twin), unit
            # sizes differ by design; the API key is each deployment's own generated secret
            for var in SCRIPT_VARS - {"RLRT_ENGINE_TP", "RLRT_ENGINE_DP", "RLRT_ENGINE_ARGS",
                                      "RLRT_ENGINE_API_KEY"}:
                assert unit.env.get(var) == twin.env.get(var), (unit, var)
            assert bool(unit.env.get("RLRT_ENGINE_API_KEY")) == bool(twin.env.get("RLRT_ENGINE_API_KEY"))
            mounts = {m["mountPath"] for m in unit.raw["container"].get("volumeMounts", [])}
            targets = {v["target"] for v in twin.raw.get("volumes", [])}
            assert unit.config is not None and twin.config is not None, unit
            assert ("/shared" in mounts) == ("/shared" in targets), unit
