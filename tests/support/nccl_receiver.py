"""TEST HARNESS: the receiving end of an NCCL weight update, over gloo on CPU, in its own
process: `python -m support.nccl_receiver` prints its URL, then serves

- `POST /v1/weights` with format "nccl": checks the metadata like the services do, joins the
  trainer's group as rank `rank_offset` when `init_group` with SGLang's own
  `init_custom_process_group` (the released source, tests/support/upstream.py), receives every bucket's tensors by
  broadcast, in the announced order, dtype and shape; answers 200 with the version;
- `GET /v1/version` -> {"version", "engine": {"engine_world_size": 1, "nccl_group"}};
- `POST /_fail {"status": N}`: the next update is refused with N before joining;
- `GET /_received` -> {name: [sum, shape, dtype]}, `GET /_inits` -> groups created.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from support.trainer_standin import serve
from support.upstream import sglang_init_custom_process_group

from protocol.messages import WeightUpdate
from protocol.weights import NcclSpec

init_custom_process_group = sglang_init_custom_process_group()

app = FastAPI()
state: dict = {"version": 0, "group": None, "key": None, "fail": None, "received": {},
               "inits": 0}


@app.get("/v1/version")
def version() -> dict:
    return {"version": state["version"],
            "engine": {"engine_world_size": 1, "nccl_group": state["key"]}}


@app.post("/_fail")
def fail(body: dict) -> dict:
    state["fail"] = int(body["status"])
    return {}


@app.get("/_received")
def received() -> dict:
    return state["received"]


@app.get("/_inits")
def inits() -> dict:
    return {"inits": state["inits"]}


@app.post("/v1/weights")
def weights(update: WeightUpdate) -> JSONResponse:
    if state["fail"]:
        status, state["fail"] = state["fail"], None
        return JSONResponse({"detail": "told to fail", "version": state["version"]}, status)
    spec = NcclSpec.model_validate(update.meta["nccl"])
    host, port = update.location.rsplit(":", 1)
    key = f"{update.location}/{spec.group_name}x{spec.world_size}"
    if spec.init_group:
        if state["group"] is not None:
            torch.distributed.destroy_process_group(state["group"])
        state["group"] = init_custom_process_group(
            backend=spec.backend, init_method=f"tcp://{host}:{port}",
            world_size=spec.world_size, rank=spec.rank_offset, group_name=spec.group_name,
            timeout=timedelta(seconds=60))
        state["key"] = key
        state["inits"] += 1
    elif state["key"] != key:
        return JSONResponse({"detail": "no such group", "version": state["version"]}, 409)
    got = {}
    for b in spec.buckets:
        for name, dtype, shape in zip(b.names, b.dtypes, b.shapes, strict=True):
            t = torch.empty(shape, dtype=getattr(torch, dtype))
            torch.distributed.broadcast(t, src=0, group=state["group"])
            got[name] = [float(t.double().sum()), shape, dtype]
    state["received"] = got
    state["version"] = update.version
    return JSONResponse({"version": update.version, "previous": 0, "seconds": 0})


if __name__ == "__main__":
    torch.set_num_threads(1)
    with serve(app) as url:
        print(url, flush=True)
        threading.Event().wait()
