"""Our SGLang and vLLM backends against real servers on a GPU (run by scripts/gpu_check.sh).

Numbers are compared with a transformers reference of the same weights in bf16, loosely:
kernels differ, so we check that scores track the reference and that a weight update moves
them to the new weights' reference, far from the old one.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from protocol.messages import SamplingParams, WeightUpdate
from protocol.weights import save_weights_dir
from services.engines.config import EngineConfig
from services.engines.factory import make_engine
from protocol.weights import Bucket

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
MODEL = os.environ.get("RLRT_GPU_MODEL")
SGLANG = os.environ.get("RLRT_SGLANG_URL")
VLLM = os.environ.get("RLRT_VLLM_URL")
PERTURBED = ("model.norm.weight",)  # scaling the final norm moves every log-prob
SEQ_TEXT = "Question: what is 12 times 7? Answer: 12 times 7 is 84."


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.mark.parametrize("kind,url", [("sglang", SGLANG), ("vllm", VLLM)])
async def test_nccl_update(kind: str, url: str | None, reference, tmp_path: Path) -> None:  # noqa: ANN001
    from trainer_side import broadcast_sglang, init_sglang_group, vllm_transfer_engine

    tok, model = reference
    eng = await make_engine(EngineConfig(kind=kind, url=need(url), model_path=MODEL))
    seq, off = sequence(tok)
    new = perturbed_state(model, 0.5)
    names = list(PERTURBED) + ["model.layers.0.input_layernorm.weight"]
    buckets = [Bucket(names=[n], dtypes=["bfloat16"], shapes=[list(new[n].shape)]) for n in names]
    world = 1 + eng.engine_world_size  # type: ignore[attr-defined]
    port = free_port()
    update = WeightUpdate(run_id="gpu", version=eng.version + 1, format="nccl",
                          location=f"127.0.0.1:{port}",
                          meta={"nccl": {"world_size": world, "group_name": "rlrt_gpu_test",
                                         "buckets": [b.model_dump() for b in buckets]}})
    tensors = [new[n].contiguous() for n in names]
    errors: list[BaseException] = []

    def trainer() -> None:  # rank 0, concurrently with the service's HTTP calls
        try:
            if kind == "sglang":
                broadcast_sglang(init_sglang_group("127.0.0.1", port, world, "rlrt_gpu_test"), tensors)
            else:
                engine_cls = vllm_transfer_engine()
                group = engine_cls.trainer_init({"master_address": "127.0.0.1",
                                                 "master_port": port, "world_size": world})
                engine_cls.trainer_send_weights(iter(zip(names, tensors, strict=True)), group)
                torch.cuda.synchronize()
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    thread = threading.Thread(target=trainer, daemon=True)
    thread.start()
    try:
        assert await eng.update_weights(update) == update.version
        await asyncio.to_thread(thread.join, 300)
        assert not errors, errors
        (got,) = await eng.score([seq], [off])
        with Swap(model, new) as m:
            want_new = ref_logprobs(m, seq, off)
        assert close_to(got, want_new) < 0.15 < close_to(got, ref_logprobs(model, seq, off))
        # restore the original weights for whatever runs next
        cfg = (Path(MODEL) / "config.json").read_text()
        sha = save_weights_dir(model.state_dict(), tmp_path / "orig", version=update.version + 1,
                               extra_files={"config.json": cfg})
        await eng.update_weights(WeightUpdate(run_id="gpu", version=update.version + 1,
                                              location=str(tmp_path / "orig"), sha256=sha))
    finally:
        await eng.close()
