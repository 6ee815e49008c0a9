"""deploy/docker: the images' Dockerfiles, their helper scripts and their pinned dependencies.

No Docker daemon runs here, so nothing is built: the Dockerfiles are linted with hadolint
(ShellCheck on every RUN), read for the properties the images promise (pinned bases, a
non-root user, a health check, a build context that holds what they copy), and the scripts
they install are run for real: the engine supervisor, the health check and the engine
launchers (against stand-ins for `python3` and `vllm`).
"""

from __future__ import annotations

import fnmatch
import http.server
import importlib.metadata as md
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from support.deploy import DOCKER, ROOT, dockerfiles

from protocol.topology import SERVICES, STAGES
from rlrt.processes import free_port

BIN = Path(sys.executable).parent
IMAGES = dockerfiles()


def tool(name: str) -> str:
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if not found:
        pytest.skip(f"{name} not installed (pip install -e '.[dev]')")
    return found


def test_all_five_images_exist():
    assert set(IMAGES) == {"verifier", "rollout", "teacher", "trainer", "cpu"}


# --------------------------------------------------------------------------- Dockerfiles


def test_hadolint_clean(tmp_path):
    out = subprocess.run([tool("hadolint"), "--no-color", *map(str, sorted(DOCKER.glob("*.Dockerfile")))],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_catches_a_root_image(tmp_path):
    """The linter run above really lints: the same call fails on a bad Dockerfile."""
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install -y curl\nUSER root\n")
    out = subprocess.run([tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60, check=False)
    assert out.returncode != 0 and "DL3007" in out.stdout and "DL3002" in out.stdout


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_base_images_pinned(name):
    # `scratch` is the empty default of TORCH_WHEELS (a torch wheel folder as an image), no base
    for base in (b for b in IMAGES[name].base_images if b != "scratch"):
        repo, sep, tag = base.rpartition(":")
        assert sep and "/" not in tag, f"{name}: base image {base} has no tag"
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{name}: {base} is not a version tag"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_non_root_with_healthcheck(name):
    df = IMAGES[name]
    assert df.user is not None and df.user.split(":")[0] not in ("0", "root"), f"{name} runs as root"
    assert df.healthcheck, f"{name} has no HEALTHCHECK"
    assert any(i == "HEALTHCHECK" for i, _ in df.instructions)


def _dockerignore_allows(path: str) -> bool:
    """.dockerignore semantics for our file: later patterns win, `!` re-includes."""
    allowed = True
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = line.lstrip("!").rstrip("/")
        parts = Path(path).parts
        hit = any(fnmatch.fnmatch("/".join(parts[: i + 1]), pat) for i in range(len(parts)))
        if pat.startswith("**/"):
            hit = any(fnmatch.fnmatch(p, pat[3:]) for p in parts)
        if hit:
            allowed = neg
    return allowed


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_copy_sources_exist_in_build_context(name):
    for instr, rest in IMAGES[name].instructions:
        if instr != "COPY" or "--from=" in rest:
            continue
        srcs = [t for t in rest.split() if not t.startswith("--")][:-1]
        for src in srcs:
            assert (ROOT / src).exists(), f"{name}: COPY {src}: no such file"
            assert _dockerignore_allows(src), f"{name}: COPY {src} is excluded by .dockerignore"


def test_dockerignore_reader_excludes():
    assert _dockerignore_allows("protocol/bus.py")
    assert not _dockerignore_allows("tests/test_bus.py")
    assert not _dockerignore_allows("runs/x")
    assert not _dockerignore_allows("services/__pycache__/x.pyc")


@pytest.mark.parametrize("name,port", [(n, STAGES[n].port) for n in SERVICES])
def test_service_images_probe_their_own_port(name, port):
    df = IMAGES[name]
    assert "--port" in df.cmd and df.cmd[df.cmd.index("--port") + 1] == str(port)
    assert f"http://127.0.0.1:{port}/healthz" in df.env["RLRT_HEALTH_URLS"].split()
    assert f"EXPOSE {port}" in [f"{i} {r}" for i, r in df.instructions]


@pytest.mark.parametrize("name,script,port", [("rollout", "rlrt-sglang-server", "30000"),
                                              ("teacher", "rlrt-vllm-server", "8000")])
def test_engine_images_wire_the_supervisor(name, script, port):
    df = IMAGES[name]
    assert df.entrypoint == ["rlrt-with-engine", "--"]
    assert df.env["RLRT_ENGINE_CMD"] == script and df.env["RLRT_ENGINE_PORT"] == port
    assert df.env["RLRT_ENGINE_HEALTH"] == f"http://127.0.0.1:{port}/health"
    assert f"http://127.0.0.1:{port}/health" in df.env["RLRT_HEALTH_URLS"].split()
    copies = [r for i, r in df.instructions if i == "COPY"]
    assert any(r.endswith(f"/usr/local/bin/{script}") for r in copies)
    assert any(r.endswith("/usr/local/bin/rlrt-with-engine") for r in copies)


def test_shellcheck_clean():
    scripts = sorted(map(str, DOCKER.glob("*.sh")))
    assert scripts
    out = subprocess.run([tool("shellcheck"), *scripts], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr


# --------------------------------------------------------------------------- dependencies


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


def _requirements(name: str) -> list[str]:
    return [canonicalize_name(line.strip()) for line in (DOCKER / name).read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def _project_requirements() -> list[Requirement]:
    return [Requirement(r) for r in md.requires("rlrt") or [] if "extra ==" not in r]


def test_constraints_pin_every_dependency_within_its_range():
    pins = _constraints()
    assert "torch" not in pins  # each image pins its own build
    for req in _project_requirements():
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in pins, f"{req.name} is a dependency of rlrt but has no pin in constraints.txt"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject's {req}")


@pytest.mark.parametrize("reqfile", ["requirements-verifier.txt", "requirements-worker.txt"])
def test_image_requirements_are_project_dependencies(reqfile):
    project = {canonicalize_name(r.name) for r in _project_requirements()}
    pins = _constraints()
    for name in _requirements(reqfile):
        assert name in project, f"{reqfile}: {name} is not a dependency of rlrt"
        assert name in pins or name == "torch", f"{reqfile}: {name} has no pin"


_BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = set(sys.argv[1].split(","))
    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is not installed in this image")
    sys.meta_path.insert(0, Blocker())
    for mod in sys.argv[2].split(","):
        __import__(mod)
    for cmd in filter(None, sys.argv[3].split(",")):
        from typer.testing import CliRunner
        import rlrt.cli
        res = CliRunner().invoke(rlrt.cli.app, ["serve", cmd, "--help"])
        assert res.exit_code == 0, res.output
    print("imported")
""")


def _blocked_modules(keep: list[str]) -> list[str]:
    """Import names of every project dependency an image leaves out."""
    left_out = {canonicalize_name(r.name) for r in _project_requirements()} - set(keep)
    mods = {mod for mod, dists in md.packages_distributions().items()
            if any(canonicalize_name(d) in left_out for d in dists) and not mod.startswith("_")}
    return sorted(mods)


@pytest.mark.parametrize("reqfile,modules,commands", [
    ("requirements-verifier.txt", ["services.verifier.main", "services.verifier.api"], ["verifier"]),
    ("requirements-worker.txt", ["services.rollout.main", "services.teacher.main",
                                 "services.engines.sglang", "services.engines.vllm"],
     ["rollout", "teacher"]),
])
def test_service_imports_with_only_its_image_requirements(reqfile, modules, commands):
    """The slim images install only these requirements: importing the service (and its CLI
    command) with every other dependency of the project blocked must work."""
    blocked = _blocked_modules(_requirements(reqfile))
    assert blocked, "nothing blocked: the check would be vacuous"
    for mod in modules:
        pytest.importorskip(mod)
    out = subprocess.run([sys.executable, "-c", _BLOCKER, ",".join(blocked), ",".join(modules),
                          ",".join(commands)], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         check=False)
    assert out.returncode == 0 and "imported" in out.stdout, out.stderr[-3000:]


def test_blocker_really_blocks():
    out = subprocess.run([sys.executable, "-c", _BLOCKER, "math_verify", "services.verifier.mathcheck", ""],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert out.returncode != 0 and "math_verify is not installed" in out.stderr


# --------------------------------------------------------------------------- scripts


def _run_health(*urls: str, env: dict | None = None) -> int:
    return subprocess.run([sys.executable, str(DOCKER / "healthcheck.py"), *urls], capture_output=True,
                          timeout=30, env={**os.environ, **(env or {})}, check=False).returncode


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200 if self.path == "/ok" else 503)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_healthcheck_script(http_url):
    assert _run_health(f"{http_url}/ok") == 0
    assert _run_health(f"{http_url}/ok", f"{http_url}/bad") == 1
    assert _run_health("http://127.0.0.1:1/none") == 1
    assert _run_health(env={"RLRT_HEALTH_URLS": f"{http_url}/ok {http_url}/ok"}) == 0
    assert _run_health(env={"RLRT_HEALTH_URLS": ""}) == 2


def _fake_bin(tmp_path: Path, name: str) -> Path:
    """A stand-in executable that records its argv and selected env as JSON."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    exe = bindir / name
    exe.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                   "print(json.dumps({'argv': sys.argv[1:], "
                   "'dev_mode': os.environ.get('VLLM_SERVER_DEV_MODE')}))\n")
    exe.chmod(0o755)
    return bindir


def _launch(script: str, bindir: Path, **env: str) -> dict:
    out = subprocess.run(["sh", str(DOCKER / script)], capture_output=True, text=True, timeout=30,
                         env={"PATH": f"{bindir}:/usr/bin:/bin", **env}, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_vllm_launcher_flags(tmp_path):
    got = _launch("vllm-server.sh", _fake_bin(tmp_path, "vllm"), RLRT_MODEL="/m",
                  RLRT_ENGINE_TP="2", RLRT_ENGINE_ARGS="--max-model-len 4096")
    argv = got["argv"]
    assert argv[:2] == ["serve", "/m"]
    assert got["dev_mode"] == "1", "the native weight-transfer API needs VLLM_SERVER_DEV_MODE=1"
    assert json.loads(_flag(argv, "--weight-transfer-config")) == {"backend": "nccl"}
    assert _flag(argv, "--host") == "127.0.0.1" and _flag(argv, "--port") == "8000"
    assert _flag(argv, "--tensor-parallel-size") == "2" and _flag(argv, "--max-model-len") == "4096"


def test_sglang_launcher_flags(tmp_path):
    got = _launch("sglang-server.sh", _fake_bin(tmp_path, "python3"), RLRT_MODEL="/m",
                  RLRT_ENGINE_HOST="0.0.0.0", RLRT_ENGINE_DP="3")
    argv = got["argv"]
    assert argv[:2] == ["-m", "sglang.launch_server"]
    assert _flag(argv, "--model-path") == "/m" and _flag(argv, "--host") == "0.0.0.0"
    assert _flag(argv, "--port") == "30000" and _flag(argv, "--dp-size") == "3"
    assert _flag(argv, "--tp-size") == "1"


def test_launchers_need_a_model(tmp_path):
    out = subprocess.run(["sh", str(DOCKER / "vllm-server.sh")], capture_output=True, text=True,
                         env={"PATH": f"{_fake_bin(tmp_path, 'vllm')}:/usr/bin:/bin"}, timeout=30,
                         check=False)
    assert out.returncode != 0 and "RLRT_MODEL" in out.stderr


# --------------------------------------------------------------------------- supervisor

ENGINE = textwrap.dedent("""
    import http.server, sys, time
    delay, mode = float(sys.argv[2]), sys.argv[3]
    time.sleep(delay)
    if mode == "crash":
        sys.exit(7)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if mode != "sick" else 500); self.end_headers()
        def log_message(self, *a): pass
    srv = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
    if mode == "die-later":
        import threading; threading.Timer(1.5, lambda: __import__("os")._exit(9)).start()
    srv.serve_forever()
""")




def _supervise(tmp_path: Path, mode: str, worker: list[str], *, delay: float = 0.2,
               timeout: float = 20) -> subprocess.Popen:
    port = free_port()
    (tmp_path / "engine.py").write_text(ENGINE)
    engine = f"{sys.executable} {tmp_path / 'engine.py'} {port} {delay} {mode}"
    return subprocess.Popen([sys.executable, str(DOCKER / "with_engine.py"), "--engine", engine,
                             "--health", f"http://127.0.0.1:{port}/health", "--start-timeout",
                             str(timeout), "--grace", "5", "--poll", "0.1", "--", *worker],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_supervisor_runs_worker_after_engine_is_healthy(tmp_path):
    marker = tmp_path / "worker-ran"
    proc = _supervise(tmp_path, "ok", [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('x')"])
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert marker.exists()
    assert "engine healthy" in err and "stopping engine" in err


@pytest.mark.parametrize("installed", [True, False], ids=["nccl-wheel", "none"])
def test_supervisor_tells_the_worker_the_engines_nccl(tmp_path, monkeypatch, installed):
    """The worker learns the NCCL wheel of the engine's Python environment (here: a real
    dist-info on the supervisor's path, as torch's nvidia-nccl-cu13 wheel installs one), the
    name SGLang's client reads (services/engines/nccl_sync.py)."""
    from services.engines.nccl_sync import ENGINE_NCCL_ENV

    site = tmp_path / "site"
    if installed:
        info = site / "nvidia_nccl_cu13-2.30.7.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: nvidia-nccl-cu13\n"
                                       "Version: 2.30.7\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.delenv(ENGINE_NCCL_ENV, raising=False)
    out = tmp_path / "seen"
    proc = _supervise(tmp_path, "ok", [sys.executable, "-c", "import os; open("
                      f"{str(out)!r}, 'w').write(os.environ.get({ENGINE_NCCL_ENV!r}, 'unset'))"])
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.read_text() == ("2.30.7" if installed else "unset")


def test_supervisor_worker_failure_is_the_exit_code(tmp_path):
    proc = _supervise(tmp_path, "ok", [sys.executable, "-c", "raise SystemExit(3)"])
    proc.communicate(timeout=30)
    assert proc.returncode == 3


def test_supervisor_engine_crash_before_health(tmp_path):
    marker = tmp_path / "worker-ran"
    proc = _supervise(tmp_path, "crash", [sys.executable, "-c", f"open({str(marker)!r}, 'w')"])
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 7 and not marker.exists()
    assert "before it was healthy" in err


def test_supervisor_engine_never_healthy_times_out(tmp_path):
    proc = _supervise(tmp_path, "sick", [sys.executable, "-c", "pass"], timeout=1.5)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "not healthy" in err


def test_supervisor_engine_death_stops_worker(tmp_path):
    proc = _supervise(tmp_path, "die-later", [sys.executable, "-c", "import time; time.sleep(60)"])
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 9
    assert "under a running worker" in err and "stopping worker" in err


def test_supervisor_sigterm_stops_worker_then_engine(tmp_path):
    log = tmp_path / "worker.log"
    worker = [sys.executable, "-c", textwrap.dedent(f"""
        import signal, sys, time
        def bye(*_):
            open({str(log)!r}, "a").write("graceful\\n"); sys.exit(0)
        signal.signal(signal.SIGTERM, bye)
        open({str(log)!r}, "a").write("started\\n")
        time.sleep(60)
    """)]
    proc = _supervise(tmp_path, "ok", worker)
    deadline = time.monotonic() + 20
    while not (log.exists() and "started" in log.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert log.read_text().splitlines() == ["started", "graceful"]
    assert err.index("stopping worker") < err.index("stopping engine")


def test_supervisor_usage_errors():
    out = subprocess.run([sys.executable, str(DOCKER / "with_engine.py"), "--", "true"],
                         capture_output=True, text=True, timeout=30, check=False,
                         env={k: v for k, v in os.environ.items() if not k.startswith("RLRT_ENGINE")})
    assert out.returncode == 2 and "need --engine" in out.stderr
