"""Weight push, disk path, against real HTTP servers on 127.0.0.1 that implement the
services' documented `POST /v1/weights` (a test double that can fail, stall or refuse):
the directory is atomic and hash-checked, failures are retried then reported, and nothing
waits longer than its timeout."""

from __future__ import annotations

import time

import pytest
import torch
from support.trainer_standin import Controls, serve, weights_app

from protocol.messages import WeightUpdate
from protocol.weights import load_weights_dir
from trainer.config import DiskPush, ServiceEndpoint
from trainer.transports.disk import WeightPusher

TOKEN = "secret"


class Service:
    """A recording double: loads each pushed directory like a real service would."""

    def __init__(self) -> None:
        self.controls = Controls()
        self.loaded: dict[int, dict[str, torch.Tensor]] = {}
        self.version = -1

    def load(self, u: WeightUpdate) -> None:
        self.loaded[u.version] = load_weights_dir(u.location, u.sha256)
        self.version = u.version

    def app(self):  # noqa: ANN201
        return weights_app(self.load, self.controls, lambda: self.version, TOKEN)


@pytest.fixture
def services():
    a, b = Service(), Service()
    with serve(a.app()) as ua, serve(b.app()) as ub:
        yield (a, ua), (b, ub)


def pusher(tmp_path, urls, **kw) -> WeightPusher:
    cfg = DiskPush(services=[ServiceEndpoint(name=f"s{i}", url=u) for i, u in enumerate(urls)],
                   control_token=kw.pop("token", TOKEN), retry_backoff_s=0.05, **kw)
    return WeightPusher(cfg, tmp_path / "weights", "run", extra_files={"config.json": "{}"})


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 3, generator=g), "b.bias": torch.randn(5, generator=g)}


async def test_push_writes_once_and_both_services_load_it(tmp_path, services):
    (a, ua), (b, ub) = services
    p = pusher(tmp_path, [ua, ub], keep=2)
    for v in (1, 2, 3):
        res = await p.push(state(v), v)
        assert sorted(res.ok) == ["s0", "s1"] and not res.failed
    for svc in (a, b):
        assert svc.version == 3 and svc.controls.calls == [1, 2, 3]
        for k, t in state(3).items():
            assert torch.equal(svc.loaded[3][k], t)
    # only the newest `keep` directories stay on disk
    assert sorted(d.name for d in (tmp_path / "weights").iterdir()) == ["v00000002", "v00000003"]


async def test_transient_failures_are_retried(tmp_path, services):
    (a, ua), (b, ub) = services
    a.controls.fail_times, a.controls.fail_status = 2, 503
    res = await pusher(tmp_path, [ua, ub], retries=3).push(state(0), 7)
    assert sorted(res.ok) == ["s0", "s1"]
    assert res.attempts == {"s0": 3, "s1": 1}
    assert a.version == 7


async def test_a_failing_service_is_reported_and_others_still_update(tmp_path, services):
    (a, ua), (b, ub) = services
    a.controls.fail_times = 100
    res = await pusher(tmp_path, [ua, ub], retries=2).push(state(0), 1)
    assert res.ok == ["s1"] and "HTTP 503" in res.failed["s0"]
    assert res.attempts["s0"] == 2 and b.version == 1 and a.version == -1


async def test_bad_token_is_not_retried(tmp_path, services):
    (a, ua), _ = services
    res = await pusher(tmp_path, [ua], retries=3, token="wrong").push(state(0), 1)
    assert "HTTP 401" in res.failed["s0"] and res.attempts["s0"] == 1


async def test_a_stalled_service_times_out_instead_of_hanging(tmp_path, services):
    (a, ua), (b, ub) = services
    a.controls.delay_s = 30
    t0 = time.monotonic()
    res = await pusher(tmp_path, [ua, ub], retries=2, timeout_s=0.5).push(state(0), 1)
    assert time.monotonic() - t0 < 10
    assert res.ok == ["s1"] and "Timeout" in res.failed["s0"]
    # and a deadline bounds the whole push, retries included
    t0 = time.monotonic()
    res = await pusher(tmp_path, [ua], retries=50, timeout_s=0.5, deadline_s=1.2).push(state(0), 2)
    assert time.monotonic() - t0 < 10 and "deadline" in res.failed["s0"]


async def test_unreachable_service_is_reported(tmp_path):
    res = await pusher(tmp_path, ["http://127.0.0.1:9"], retries=2).push(state(0), 1)
    assert "ConnectError" in res.failed["s0"]


async def test_a_refusal_is_reported_without_retrying(tmp_path, services):
    (a, ua), _ = services
    a.controls.fail_times, a.controls.fail_status = 100, 409  # e.g. a stale version
    res = await pusher(tmp_path, [ua], retries=3).push(state(0), 1)
    assert "HTTP 409" in res.failed["s0"] and res.attempts["s0"] == 1


async def test_a_resumed_run_keeps_what_it_writes_and_drops_the_killed_runs_versions(
        tmp_path, services):
    """Issue 16, defect 1 (the repro: checkpoint at 5, killed after 7, --resume). The first
    push of the resumed process re-writes v5 while the killed run's v6 and v7 are still on
    disk: it must not be pruned as "the oldest" (every service then fails to load it), and
    the dead run's versions must not outlive the new run's own."""
    (a, ua), (b, ub) = services
    killed = pusher(tmp_path, [ua, ub], keep=2, retries=1)
    for v in range(1, 8):
        assert not (await killed.push(state(v), v)).failed
    resumed = pusher(tmp_path, [ua, ub], keep=2, retries=1)  # a new process, same weights root
    res = await resumed.push(state(50), 5)
    assert sorted(res.ok) == ["s0", "s1"] and not res.failed, res.failed
    for svc in (a, b):
        assert svc.version == 5 and torch.equal(svc.loaded[5]["b.bias"], state(50)["b.bias"])
    assert sorted(d.name for d in (tmp_path / "weights").iterdir()) == ["v00000005"]
    for v in (6, 7):
        assert not (await resumed.push(state(60 + v), v)).failed
    assert sorted(d.name for d in (tmp_path / "weights").iterdir()) == ["v00000006", "v00000007"]
    assert torch.equal(load_weights_dir(tmp_path / "weights" / "v00000007")["b.bias"],
                       state(67)["b.bias"])
