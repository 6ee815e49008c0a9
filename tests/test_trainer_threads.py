"""trainer.idle_threads (trainer/threads.py): the update switches its torch thread count at the
blocks' forward and backward on its own thread, only while an update runs, and back at its end;
every collective of rank 0 runs on one compute thread; a real run with nothing in flight during
its updates (max_staleness 0) runs them on the idle thread count."""

from __future__ import annotations

import json
import threading

import torch
from support.tiny_model import POLICY, char_tokenizer, save_tiny_policy, tiny_model
from support.trainer_standin import StandinPipeline, standin_config

from protocol.config import BusSettings
from trainer.collectives import RankZero
from trainer.main import run_trainer
from trainer.threads import ThreadSwitch, _blocks


def _on_thread(fn):  # noqa: ANN001, ANN202 - run fn on a fresh thread (as the compute thread)
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    return torch.log_softmax(logits, -1).gather(-1, ids[:, :, None]).mean()


def test_the_update_switches_at_blocks_only_while_it_runs():
    torch.set_num_threads(1)
    model = tiny_model(char_tokenizer(), **POLICY).train()
    switch = ThreadSwitch(busy=1, idle=2)
    switch.attach(model)
    seen: dict[str, list[int]] = {"forward": [], "backward": []}

    def record(_m, _i, out):  # noqa: ANN001, ANN202 - after attach's hooks: sees the count applied
        seen["forward"].append(torch.get_num_threads())
        out = out[0] if isinstance(out, tuple) else out
        if out.requires_grad:
            out.register_hook(lambda _g: seen["backward"].append(torch.get_num_threads()))

    for block in _blocks(model):
        block.register_forward_hook(record)
    ids = torch.randint(0, model.config.vocab_size, (4, 12))

    def update() -> tuple[int, dict[str, torch.Tensor]]:
        switch.set_drained(False)
        with switch.update():
            loss = _loss(model, ids)  # the services still work: busy threads
            switch.set_drained(True)  # the last group arrives between forward and backward
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        return torch.get_num_threads(), grads

    after, grads = _on_thread(update)
    n = len(_blocks(model))
    assert n == POLICY["layers"]
    assert seen == {"forward": [1] * n, "backward": [2] * n}
    assert after == 1 and switch.idle_s > 0  # back to the busy count on the compute thread

    # Outside an update (a canary forward, a gather) nothing switches, drained or not.
    seen["forward"].clear()
    _on_thread(lambda: _loss(model, ids))
    assert seen["forward"] == [1] * n

    # The thread count changes the speed, not the result (up to float rounding).
    switch.set_drained(False)
    plain = _on_thread(lambda: (_loss(model, ids).backward(),
                                {k: p.grad.clone() for k, p in model.named_parameters()})[1])
    for k, g in grads.items():
        torch.testing.assert_close(g, plain[k], rtol=1e-5, atol=1e-6)


async def test_every_collective_runs_on_one_compute_thread():
    class Ops:
        def ident(self) -> int:
            return threading.get_ident()

    rz = RankZero(Ops())  # type: ignore[arg-type]  # _announce needs only a callable
    ids = {await rz._announce(rz.ops.ident) for _ in range(4)}
    ids.add(await rz._announce(rz.ops.ident))
    assert len(ids) == 1 and threading.get_ident() not in ids
    await rz.stop()
    assert rz.compute._shutdown


def test_a_run_with_nothing_in_flight_updates_on_the_idle_threads(tmp_path, redis_url, prefix):
    torch.set_num_threads(1)
    model = save_tiny_policy(tmp_path / "policy")
    bus = BusSettings(redis_url=redis_url, prefix=prefix)
    standin = StandinPipeline(model, bus, token="tok")
    with standin.running() as url:
        cfg = standin_config(model, tmp_path / "out", url, max_staleness=0, torch_threads=1,
                             idle_threads=2)
        summary = run_trainer(cfg, bus)
    assert summary["completed"]
    records = [json.loads(x) for x in (cfg.out / "metrics.jsonl").read_text().splitlines()]
    # max_staleness 0: every group of a step has arrived before its update, so the whole
    # update runs on the idle count
    assert all(r["time_idle_threads_s"] > 0.5 * r["time_update_s"] for r in records), [
        (r["time_idle_threads_s"], r["time_update_s"]) for r in records]
    assert torch.get_num_threads() == 1
