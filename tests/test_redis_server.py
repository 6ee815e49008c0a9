"""The embedded redis-server is supervised like any child (issue 16, defect 4): it dies with
the process that started it, a second server on a live AOF directory is refused, and a
server that died is started again on the same data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import redis
from support.polling import wait_until

from rlrt.redis_server import EmbeddedRedis, RedisDirBusy

REPO = Path(__file__).resolve().parents[1]

_OWNER = """
import sys, time
from rlrt.redis_server import EmbeddedRedis
s = EmbeddedRedis(sys.argv[1])
s.start()
print(s.proc.pid, flush=True)
time.sleep(600)
"""


def _gone(pid: int, timeout_s: float = 15.0) -> bool:
    try:
        psutil.Process(pid).wait(timeout_s)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        return False
    return True


def test_a_sigkilled_owner_takes_its_redis_server_with_it(tmp_path: Path) -> None:
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, str(tmp_path / "r")], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                             text=True)
    try:
        pid = int(owner.stdout.readline())
        assert psutil.pid_exists(pid)
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        assert _gone(pid), "redis-server outlived the process that started it (orphan)"
        # Its lock went with it: the next run starts on the same directory at once.
        again = EmbeddedRedis(tmp_path / "r", busy_wait_s=0)
        again.start()
        again.stop()
    finally:
        owner.kill()


def test_a_second_server_on_a_live_directory_is_refused(tmp_path: Path) -> None:
    first = EmbeddedRedis(tmp_path / "r")
    url = first.start()
    try:
        redis.Redis.from_url(url).set("k", "v")
        with pytest.raises(RedisDirBusy, match=r"another redis-server \(pid \d+\) is still serving"):
            EmbeddedRedis(tmp_path / "r", busy_wait_s=0.3).start()
        # The first server is untouched: same socket, same data.
        assert redis.Redis.from_url(url).get("k") == b"v"
    finally:
        first.stop()


def test_a_killed_server_restarts_on_the_same_data(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "r")
    url = server.start()
    try:
        redis.Redis.from_url(url).set("k", "v")
        server.proc.kill()  # SIGKILL: the AOF was written before the reply, nothing is lost
        server.proc.wait(10)
        assert not server.alive
        t0 = time.monotonic()
        assert server.restart() == url
        assert server.restarts == 1 and time.monotonic() - t0 < 10
        assert redis.Redis.from_url(url).get("k") == b"v"
    finally:
        server.stop()


@pytest.mark.slow  # waits out EmbeddedRedis.busy_wait_s (15 s) behind a CLI start-up
def test_rlrt_train_refuses_a_run_whose_redis_is_still_up(tmp_path: Path) -> None:
    """`--resume` while the killed run's redis-server still serves the run directory: one
    clear line, and the live server is left alone (it used to get a twin on the same AOF)."""
    import yaml

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    run = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "run": {"dir": str(run), "bootstrap": False, "eval_prompts": 0},
        "verifier": {"port": 0},
        "rollout": {"port": 0, "engine": {"kind": "cpu", "model_path": str(model)}},
        "teacher": {"port": 0, "engine": {"kind": "cpu", "model_path": str(model)}},
        "trainer": {"model_path": str(model), "output_dir": str(run / "trainer")},
    }))
    live = EmbeddedRedis(run / "redis")
    url = live.start()
    try:
        res = subprocess.run([sys.executable, "-m", "rlrt.cli", "train", "--config", str(cfg),
                              "--resume"], cwd=REPO, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert lines[-1].startswith("error: another redis-server"), res.stderr[-2000:]
        assert redis.Redis.from_url(url).ping()  # untouched
    finally:
        live.stop()


def _aof_with_writes(directory: Path, n: int = 200) -> Path:
    server = EmbeddedRedis(directory)
    url = server.start()
    r = redis.Redis.from_url(url)
    for i in range(n):
        r.xadd("s", {"i": str(i), "pad": "x" * 40})
    server.stop()  # SIGTERM: the AOF is flushed
    return directory / "appendonly.aof"


@pytest.mark.parametrize("damage", ["cut", "corrupt"])
def test_a_damaged_aof_is_refused_with_the_repair_command_and_the_repair_works(
        tmp_path: Path, damage: str) -> None:
    """Redis 6.2 loads a cut AOF silently by default (dropping its tail): the embedded server
    refuses it, one line names the repair, and the shipped repair (the server binary run as
    redis-check-aof) brings back everything before the damage."""
    from rlrt.redis_server import AofDamaged, repair_aof

    d = tmp_path / "r"
    aof = _aof_with_writes(d)
    data = bytearray(aof.read_bytes())
    if damage == "cut":
        aof.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) // 2: len(data) // 2 + 8] = b"ZZZZZZZZ"
        aof.write_bytes(bytes(data))
    with pytest.raises(AofDamaged) as e:
        EmbeddedRedis(d).start()
    kind = "cut short" if damage == "cut" else "corrupted"
    assert str(e.value).startswith(f"the Redis append-only file {d.resolve()}/appendonly.aof "
                                   f"is damaged ({kind}): Redis refused to load it")
    assert f"rlrt redis --directory {d.resolve()} --fix-aof" in str(e.value)
    assert "\n" not in str(e.value)

    valid, said = repair_aof(d, fix=False)
    assert not valid and "AOF is not valid" in said
    valid, said = repair_aof(d, fix=True)
    assert valid, said
    backups = list(d.glob("appendonly.aof.damaged-*"))
    assert len(backups) == 1 and backups[0].read_bytes()[:100] == bytes(data[:100])
    assert repair_aof(d, fix=False)[0]

    server = EmbeddedRedis(d)
    url = server.start()
    try:
        got = [int(f[b"i"]) for _, f in redis.Redis.from_url(url).xrange("s")]
        assert 0 < len(got) < 200 and got == list(range(len(got)))  # the prefix, in order
    finally:
        server.stop()


def test_repairing_an_aof_a_live_server_serves_is_refused(tmp_path: Path) -> None:
    from rlrt.redis_server import repair_aof

    _aof_with_writes(tmp_path / "r", n=3)
    live = EmbeddedRedis(tmp_path / "r")
    live.start()
    try:
        with pytest.raises(RedisDirBusy, match=r"a redis-server \(pid \d+\) is serving"):
            repair_aof(tmp_path / "r", fix=True)
    finally:
        live.stop()


def test_the_aof_is_rewritten_down_to_the_live_data_and_a_restart_keeps_it(tmp_path: Path) -> None:
    """The bus deletes acked entries, but the AOF only appends: without a rewrite it grows by
    every message ever sent (Redis 6.2 rewrites only past 64 MB). With the embedded server's
    policy it is rewritten to the live data once past `aof_rewrite_min_mb` and doubled."""
    from rlrt.run_config import RunSettings
    from rlrt.supervisor import own_redis

    d = tmp_path / "r"
    run = RunSettings(redis_aof_rewrite_mb=1)
    server = own_redis(None, tmp_path, run)  # as `rlrt train` makes it, with the run's knob
    assert server is not None and server.directory == (tmp_path / "redis").resolve()
    server = EmbeddedRedis(d, aof_rewrite_min_mb=run.redis_aof_rewrite_mb)
    url = server.start()
    try:
        r = redis.Redis.from_url(url)
        assert r.config_get("auto-aof-rewrite-min-size")["auto-aof-rewrite-min-size"] == \
            str(1024 * 1024)
        r.xgroup_create("s", "g", id="0", mkstream=True)
        pad = "x" * 1000
        live = []
        for batch in range(60):  # ~6 MB appended: 6x the threshold
            p = r.pipeline(transaction=False)
            for i in range(100):
                p.xadd("s", {"n": str(batch * 100 + i), "pad": pad})
            ids = p.execute()
            live.append(ids[0])  # one entry per batch stays (unacked work in flight)
            r.xdel("s", *ids[1:])  # what the bus does with an acked entry
            # A run writes far slower than a rewrite takes; this loop does not: what it wrote
            # during a rewrite would be appended to the new file and raise the next threshold
            # (100% growth over the rewritten size), so wait out a rewrite under way.
            wait_until(lambda: not r.info("persistence")["aof_rewrite_in_progress"], 60,
                       "the rewrite under way to finish")
        written = 60 * 100 * len(pad)

        def rewritten() -> bool:
            # Redis checks the policy on its timer (10 times a second): the writes above
            # outran it, so the last rewrite may come after them
            info = r.info("persistence")
            return (info["aof_current_size"] < written / 3 and info["aof_base_size"] > 0
                    and not info["aof_rewrite_in_progress"])

        wait_until(rewritten, 60, "an AOF rewrite down to the live data")
        assert r.info("persistence")["aof_last_bgrewrite_status"] == "ok"
        # one more write after the rewrite, to be found after the restart too
        live.append(r.xadd("s", {"n": "last", "pad": pad}))
        server.stop()  # SIGTERM: the AOF is flushed
        size = (d / "appendonly.aof").stat().st_size
        # far smaller than what went through it: the 61 live entries and what was written
        # after the last rewrite, not 6 MB
        assert size < written / 3, (size, written)
        from rlrt.redis_server import repair_aof

        assert repair_aof(d, fix=False)[0]  # a plain AOF: the --fix-aof repair still applies

        url = server.start()
        r = redis.Redis.from_url(url)
        assert [i for i, _ in r.xrange("s")] == live
        assert r.xinfo_groups("s")[0]["name"] == b"g"
    finally:
        server.stop()
