"""Weight transports (trainer/transports/): the push section's mode picks one (a pydantic
discriminated union), and NCCL with its disk fallback sends by disk exactly when it should --
the first push, every disk_every-th, and the services an NCCL update failed -- to real HTTP
services on 127.0.0.1 (the recording double of test_trainer_push)."""

from __future__ import annotations

import pytest
from support.trainer_standin import serve
from test_trainer_push import TOKEN, Service, state

from protocol.canary import Canary
from protocol.config import ConfigError
from rlrt.config import load_section
from trainer.config import DiskPush, NcclPush, ServiceEndpoint
from trainer.transports import (
    DiskTransport,
    NcclWithDiskFallback,
    PushResult,
    make_transport,
)


class Ranks:
    """The collectives a transport asks for, as rank 0 alone would run them; the NCCL
    broadcast 'fails' for the services named in `nccl_fails`."""

    def __init__(self, services: list[str], nccl_fails: set[str] = frozenset()) -> None:
        self.services = services
        self.nccl_fails = nccl_fails
        self.calls: list[tuple[str, int | None]] = []

    async def gather_weights(self):  # noqa: ANN201
        self.calls.append(("gather", None))
        return state(1)

    async def broadcast_nccl(self, version: int, canary: Canary | None) -> PushResult:
        self.calls.append(("nccl", version))
        return PushResult(version=version, ok=[s for s in self.services if s not in self.nccl_fails],
                          failed={s: "HTTP 502: broadcast" for s in self.nccl_fails})


@pytest.fixture
def services():
    a, b = Service(), Service()
    with serve(a.app()) as ua, serve(b.app()) as ub:
        yield (a, ua), (b, ub)


def nccl_cfg(urls: list[str], **kw) -> NcclPush:
    return NcclPush(services=[ServiceEndpoint(name=f"s{i}", url=u, engine="sglang")
                              for i, u in enumerate(urls)],
                    control_token=TOKEN, retry_backoff_s=0.05, overlap=False, **kw)


def test_the_mode_picks_the_config_model_and_the_transport(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    path = tmp_path / "run.yaml"
    path.write_text("trainer: {model_path: /m, push: {mode: nccl, disk_every: 3, services: "
                    "[{name: r, url: 'http://x', engine: vllm}]}}\n")
    push = load_section("trainer", str(path)).push
    assert isinstance(push, NcclPush) and push.disk_every == 3
    assert isinstance(make_transport(push, tmp_path, "run"), NcclWithDiskFallback)
    path.write_text("trainer: {model_path: /m, push: {every: 2}}\n")
    push = load_section("trainer", str(path)).push
    assert type(push) is DiskPush and push.every == 2  # no mode: disk
    assert isinstance(make_transport(push, tmp_path, "run"), DiskTransport)
    # the environment may pick the mode too
    monkeypatch.setenv("RLRT_TRAINER__PUSH__MODE", "nccl")
    path.write_text("trainer: {model_path: /m, push: {nccl_backend: gloo}}\n")
    assert isinstance(load_section("trainer", str(path)).push, NcclPush)


def test_a_knob_of_the_other_mode_says_which_mode(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "run.yaml"
    path.write_text("trainer: {model_path: /m, push: {mode: disk, disk_every: 3}}\n")
    with pytest.raises(ConfigError, match=r"push\.disk_every: knob\(s\) of push\.mode nccl"):
        load_section("trainer", str(path))
    path.write_text("trainer: {model_path: /m, push: {mode: nccl, services: [{name: r, url: u}]}}\n")
    with pytest.raises(ConfigError, match="needs engine"):
        load_section("trainer", str(path))
    path.write_text("trainer: {model_path: /m, push: {mode: carrier-pigeon}}\n")
    with pytest.raises(ConfigError, match="'disk', 'nccl'"):
        load_section("trainer", str(path))
    # a secret stays hidden through the union's tag (trainer.push.nccl.control_token)
    path.write_text("trainer: {model_path: /m, push: {mode: nccl, control_token: [s3cret-x]}}\n")
    with pytest.raises(ConfigError, match=r"push\.nccl\.control_token") as e:
        load_section("trainer", str(path))
    assert "s3cret-x" not in str(e.value)


async def test_disk_on_the_first_and_every_disk_every_th_push(tmp_path, services) -> None:  # noqa: ANN001
    (a, ua), (b, ub) = services
    transport = make_transport(nccl_cfg([ua, ub], disk_every=3), tmp_path / "w", "run")
    ranks = Ranks(["s0", "s1"])
    for index in range(5):
        res = await transport.push(10 + index, ranks, index=index, canary=None)
        assert sorted(res.ok) == ["s0", "s1"] and not res.failed
    assert ranks.calls == [("gather", None), ("nccl", 11), ("nccl", 12), ("gather", None),
                           ("nccl", 14)]
    assert a.controls.calls == b.controls.calls == [10, 13]  # the disk pushes reached both


async def test_a_failed_nccl_update_falls_back_to_disk_for_that_service(tmp_path, services) -> None:  # noqa: ANN001
    (a, ua), (b, ub) = services
    transport = make_transport(nccl_cfg([ua, ub], disk_every=0), tmp_path / "w", "run")
    ranks = Ranks(["s0", "s1"], nccl_fails={"s1"})
    await transport.push(1, ranks, index=0, canary=None)  # the first: by disk
    res = await transport.push(2, ranks, index=1, canary=None)
    assert sorted(res.ok) == ["s0", "s1"] and res.failed == {}
    assert a.controls.calls == [1] and b.controls.calls == [1, 2]  # only s1 got v2 by disk
    b.controls.fail_times, b.controls.fail_status = 1, 409  # and the disk refuses it too
    res = await transport.push(3, ranks, index=2, canary=None)
    assert res.ok == ["s0"]
    assert res.failed["s1"].startswith("HTTP 502: broadcast; disk fallback: ")
    assert "409" in res.failed["s1"]
