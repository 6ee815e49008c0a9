"""Our SGLang and vLLM backends against real servers on a GPU (run by scripts/gpu_check.sh).

Numbers are compared with a transformers reference of the same weights in bf16, loosely:
kernels differ, so we check that scores track the reference and that a weight update moves
them to the new weights' reference, far from the old one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from protocol.messages import SamplingParams, WeightUpdate
from protocol.weights import Bucket, save_weights_dir
from rlrt.processes import free_port
from services.engines.config import EngineConfig
from services.engines.factory import make_engine

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
MODEL = os.environ.get("RLRT_GPU_MODEL")
SGLANG = os.environ.get("RLRT_SGLANG_URL")
VLLM = os.environ.get("RLRT_VLLM_URL")
PERTURBED = ("model.norm.weight",)  # scaling the final norm moves every log-prob
SEQ_TEXT = "Question: what is 12 times 7? Answer: 12 times 7 is 84."
TOKEN = "gpu-check"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def need(url: str | None) -> str:
    if not MODEL or not url:
        pytest.skip("set RLRT_GPU_MODEL and the server URL (see tests/gpu/README.md)")
    return url


@pytest.fixture(scope="module")
def reference():  # noqa: ANN201 - (tokenizer, model)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not MODEL:
        pytest.skip("RLRT_GPU_MODEL not set")
    tok = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.bfloat16).cuda().eval()
    return tok, model


@torch.no_grad()
def ref_logprobs(model, seq: list[int], offset: int) -> np.ndarray:  # noqa: ANN001
    logits = model(torch.tensor([seq], device="cuda")).logits[0, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(seq[1:], device="cuda")[:, None])[:, 0]
    return lp[offset - 1:].cpu().numpy()


def perturbed_state(model, factor: float) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {n: p.detach().clone() * (factor if n in PERTURBED else 1.0)
            for n, p in model.state_dict().items()}


class Swap:
    """The reference model temporarily holding other weights."""

    def __init__(self, model, state: dict[str, torch.Tensor]) -> None:  # noqa: ANN001
        self.model, self.state = model, state

    def __enter__(self):  # noqa: ANN204
        self.saved = {n: self.model.state_dict()[n].clone() for n in PERTURBED}
        self.model.load_state_dict({n: self.state[n] for n in PERTURBED}, strict=False)
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.model.load_state_dict(self.saved, strict=False)




def sequence(tok) -> tuple[list[int], int]:  # noqa: ANN001
    ids = tok(SEQ_TEXT)["input_ids"]
    return ids, len(ids) // 2


def close_to(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean(np.abs(got - want)))


@pytest.mark.parametrize("kind,url", [("sglang", SGLANG), ("vllm", VLLM)])
async def test_generate_and_score_track_reference(kind: str, url: str | None, reference) -> None:  # noqa: ANN001
    tok, model = reference
    eng = await make_engine(EngineConfig(kind=kind, url=need(url), model_path=MODEL))
    try:
        prompt = tok("The capital of France is")["input_ids"]
        outs = await eng.generate(prompt, 4, SamplingParams(max_new_tokens=16, temperature=1.0, seed=1))
        assert len(outs) == 4 and all(len(o.token_ids) > 0 for o in outs)
        for o in outs:
            ref = ref_logprobs(model, prompt + o.token_ids.tolist(), len(prompt))
            assert close_to(o.logprobs, ref) < 0.15
        seq, off = sequence(tok)
        (got,) = await eng.score([seq], [off])
        assert close_to(got, ref_logprobs(model, seq, off)) < 0.15
    finally:
        await eng.close()


@pytest.mark.parametrize("kind,url", [("sglang", SGLANG), ("vllm", VLLM)])
async def test_disk_update_and_restore(kind: str, url: str | None, reference, tmp_path: Path) -> None:  # noqa: ANN001
    tok, model = reference
    eng = await make_engine(EngineConfig(kind=kind, url=need(url), model_path=MODEL))
    seq, off = sequence(tok)
    new = perturbed_state(model, 0.5)
    cfg = (Path(MODEL) / "config.json").read_text()
    sha_new = save_weights_dir(new, tmp_path / "new", version=1, extra_files={"config.json": cfg})
    sha_old = save_weights_dir(model.state_dict(), tmp_path / "old", version=2,
                               extra_files={"config.json": cfg})
    try:
        v0 = eng.version
        await eng.update_weights(WeightUpdate(run_id="gpu", version=v0 + 1,
                                              location=str(tmp_path / "new"), sha256=sha_new))
        (got,) = await eng.score([seq], [off])
        with Swap(model, new) as m:
            want_new = ref_logprobs(m, seq, off)
        want_old = ref_logprobs(model, seq, off)
        assert close_to(got, want_new) < 0.15 < close_to(got, want_old)
        await eng.update_weights(WeightUpdate(run_id="gpu", version=v0 + 2,
                                              location=str(tmp_path / "old"), sha256=sha_old))
        (back,) = await eng.score([seq], [off])
        assert close_to(back, want_old) < 0.15
    finally:
        await eng.close()


@contextlib.contextmanager
def engine_service(kind: str, url: str, tmp_path: Path) -> Iterator[str]:
    """Our real service in front of the server, as deployed: `rlrt serve rollout|teacher`
    (control API only: no Redis), in its own process. Yields its URL."""
    section = "rollout" if kind == "sglang" else "teacher"
    port = free_port()
    cfg = tmp_path / f"{section}.yaml"
    cfg.write_text(json.dumps({section: {
        "token": TOKEN, "engine": {"kind": kind, "url": url, "model_path": MODEL,
                                   "weight_update_timeout_s": 600}}}))
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("RLRT_")}
    proc = subprocess.Popen([sys.executable, "-m", "rlrt.cli", "serve", section, "--config",
                             str(cfg), "--host", "127.0.0.1", "--port", str(port)], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            if proc.poll() is not None:
                raise RuntimeError(f"rlrt serve {section} exited with {proc.returncode}")
            try:
                if httpx.get(f"{base}/v1/version", headers=AUTH, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise RuntimeError(f"rlrt serve {section} not ready after 300 s")
        yield base
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.mark.parametrize("kind,url", [("sglang", SGLANG), ("vllm", VLLM)])
async def test_nccl_push_through_our_service_and_canary(kind: str, url: str | None, reference,
                                                        tmp_path: Path) -> None:  # noqa: ANN001
    """The production path end to end: the trainer's `push_buckets` (trainer/
    transports/nccl.py: Peer, group join, broadcasts) -> our service's /v1/weights -> the
    engine's NCCL endpoints; twice (a new group, then the group reused). Then the canary
    comparison: the server's log-probs equal the trainer's (the reference with the pushed
    weights) within the bf16 canary tolerance, and differ from the old weights'."""
    from protocol.canary import DEFAULT_TOLERANCE, Canary, compare, tolerance_for
    from trainer.config import NcclPush, ServiceEndpoint
    from trainer.transports.base import PushResult
    from trainer.transports.nccl import Peer, push_buckets

    tok, model = reference
    seq, _ = sequence(tok)
    client = await make_engine(EngineConfig(kind=kind, url=need(url), model_path=MODEL))
    with engine_service(kind, url, tmp_path) as svc_url:
        push = NcclPush(master_address="127.0.0.1", master_port=free_port(),
                        nccl_timeout_s=600, control_token=TOKEN,
                        services=[ServiceEndpoint(name=kind, url=svc_url, engine=kind)])
        peer = Peer(push.services[0], push, push.master_port)
        version = int(httpx.get(f"{svc_url}/v1/version", headers=AUTH).json()["version"])
        try:
            for factor in (0.5, 0.25):  # the second push reuses the group
                new = perturbed_state(model, factor)
                names = list(PERTURBED) + ["model.layers.0.input_layernorm.weight"]
                meta = [Bucket(names=[n], dtypes=["bfloat16"], shapes=[list(new[n].shape)])
                        for n in names]
                buckets = [[(n, new[n].to(torch.bfloat16).contiguous())] for n in names]
                version += 1
                with Swap(model, new) as m:
                    want = ref_logprobs(m, seq, 1)
                # the trainer's canary rides the push: the service itself judges it (409 on a
                # mismatch), and we compare once more from outside below
                canary = Canary(sequences=[seq], logprobs=[want.tolist()], dtype="bfloat16")
                res = PushResult(version=version, location=f"127.0.0.1:{push.master_port}")
                await asyncio.to_thread(push_buckets, [peer], version, meta, iter(buckets), res,
                                        run_id="gpu", timeout_s=600, canary=canary)
                assert res.ok == [kind] and not res.failed, res.failed
                got = httpx.get(f"{svc_url}/v1/version", headers=AUTH).json()
                assert got["version"] == version and got["engine"]["nccl_group"] == peer.group_key()
                client._version = version  # noqa: SLF001 - this client did not push
                (served,) = await client.score([seq], [1])
                verdict = compare(canary, [served.tolist()],
                                  tolerance_for(["bfloat16"], DEFAULT_TOLERANCE))
                assert verdict.ok, verdict.describe()
                assert close_to(served, ref_logprobs(model, seq, 1)) > close_to(served, want)
            # restore the original weights for whatever runs next
            cfg = (Path(MODEL) / "config.json").read_text()
            sha = save_weights_dir(model.state_dict(), tmp_path / "orig", version=version + 1,
                                   extra_files={"config.json": cfg})
            r = httpx.post(f"{svc_url}/v1/weights", headers=AUTH, timeout=900, json={
                "run_id": "gpu", "version": version + 1, "location": str(tmp_path / "orig"),
                "sha256": sha})
            assert r.status_code == 200, r.text
        finally:
            peer.reset()
            await client.close()
