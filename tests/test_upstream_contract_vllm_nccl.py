"""Contract: the NCCL weight transfer with vLLM, both halves, against the released vllm
package (the trainer image's pin, fetched by scripts/fetch-upstream.sh), read with `ast`:

- service side (services/engines/vllm.py): the RL endpoints it calls exist (POST) and take
  the body keys it sends; `init_info` holds only fields of NCCLWeightTransferInitInfo (with
  `packed` there: a group parameter) and every required one; `update_info` holds exactly
  NCCLWeightTransferUpdateInfo's fields;
- trainer side (trainer/transports/nccl.py): `vllm.distributed.weight_transfer.nccl_common.
  trainer_init` exists, reads only the keys we pass, and PyNccl's broadcast takes
  (tensor, src, stream); the removed `NCCLWeightTransferEngine.trainer_init/
  trainer_send_weights` are not used.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from support import upstream

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def src() -> dict[str, Path]:
    return {
        "router": upstream.source("vllm", "entrypoints/rl/online/api_router.py"),
        "common": upstream.source("vllm", "distributed/weight_transfer/nccl_common.py"),
        "engine": upstream.source("vllm", "distributed/weight_transfer/nccl_engine.py"),
        "pynccl": upstream.source("vllm", "distributed/device_communicators/pynccl.py"),
    }


def _function(path: Path, name: str, cls: str | None = None) -> ast.FunctionDef:
    tree = upstream.parse(path)
    scope = tree.body
    if cls is not None:
        scope = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
    fns = [n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
           and n.name == name]
    assert fns, f"vllm {upstream.version('vllm')}: no {cls + '.' if cls else ''}{name} in {path}"
    return fns[0]


def _dict_keys(fn: ast.AST, var: str) -> set[str]:
    """Keys of the dict literal assigned to `var` inside `fn`."""
    for node in ast.walk(fn):
        if (isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict)
                and var in [t.id for t in (node.targets if isinstance(node, ast.Assign)
                                           else [node.target]) if isinstance(t, ast.Name)]):
            return {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    raise AssertionError(f"no dict literal {var} = {{...}}")


def _posts(fn: ast.AST) -> dict[str, set[str]]:
    """{route: body keys} of `self.http.post("/route", {...})` calls in `fn` (a body given
    by name is looked up as a dict literal in the same function)."""
    out: dict[str, set[str]] = {}
    for node in ast.walk(fn):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "post" and node.args
                and isinstance(node.args[0], ast.Constant)):
            body = node.args[1] if len(node.args) > 1 else None
            if isinstance(body, ast.Dict):
                keys = {k.value for k in body.keys if isinstance(k, ast.Constant)}
            elif isinstance(body, ast.Name):
                keys = _dict_keys(fn, body.id)
            else:
                keys = set()
            out.setdefault(node.args[0].value, set()).update(keys)
    return out


def test_the_fetched_vllm_is_the_trainer_pin_and_the_teacher_image() -> None:
    trainer = (ROOT / "deploy/docker/trainer.Dockerfile").read_text()
    teacher = (ROOT / "deploy/docker/teacher.Dockerfile").read_text()
    pin = re.search(r"^ARG VLLM_VERSION=([\d.]+)$", trainer, re.M)
    image = re.search(r"^ARG VLLM_IMAGE=vllm/vllm-openai:v([\d.]+)$", teacher, re.M)
    assert pin and image and pin.group(1) == image.group(1) == upstream.version("vllm")


def test_service_side_routes_and_bodies(src) -> None:
    from services.engines import vllm as client

    table = upstream.routes(src["router"])
    fn = _function(Path(client.__file__), "_srv_nccl", "VLLMEngine")
    posts = _posts(fn)
    assert {"/init_weight_transfer_engine", "/start_weight_update", "/update_weights",
            "/finish_weight_update"} <= set(posts)
    for route, keys in posts.items():
        assert "POST" in table.get(route, set()), f"vllm has no POST {route}"
        handler = upstream.handler(src["router"], route)
        embedded = {a.arg for a in handler.args.args if a.arg != "raw_request"}
        assert keys <= embedded, f"{route}: we send {keys}, upstream takes {embedded}"
    # init_info: fields of the worker's init info, packed among them, all required ones sent
    init_fields = upstream.fields(src["common"], "NCCLWeightTransferInitInfo")
    init_keys = _dict_keys(fn, "init_info")
    assert "packed" in init_keys and init_keys <= set(init_fields), init_keys - set(init_fields)
    assert {k for k, f in init_fields.items() if f["required"]} <= init_keys
    # update_info: exactly the update info's fields (no per-bucket `packed` any more)
    update_fields = upstream.fields(src["engine"], "NCCLWeightTransferUpdateInfo")
    assert _dict_keys(fn, "info") == set(update_fields)


def test_the_fakes_nccl_fields_are_vllms(src) -> None:
    from support import fake_vllm

    init = upstream.fields(src["common"], "NCCLWeightTransferInitInfo")
    assert fake_vllm.NCCL_INIT_INFO_FIELDS == set(init)
    update = upstream.fields(src["engine"], "NCCLWeightTransferUpdateInfo")
    assert fake_vllm.NCCL_UPDATE_INFO_FIELDS == set(update)
    routes = upstream.routes(src["router"])
    for route in ("/init_weight_transfer_engine", "/start_weight_update", "/update_weights",
                  "/finish_weight_update", "/get_world_size"):
        assert route in routes, route


def test_trainer_side_uses_vllms_current_api(src) -> None:
    from trainer.transports import nccl as ours

    ours_src = Path(ours.__file__).read_text()
    assert "NCCLWeightTransferEngine" not in ours_src  # trainer_init/trainer_send_weights: gone
    assert "from vllm.distributed.weight_transfer.nccl_common import trainer_init" in ours_src
    fn = _function(src["common"], "trainer_init")
    read = {n.slice.value for n in ast.walk(fn) if isinstance(n, ast.Subscript)
            and isinstance(n.value, ast.Name) and n.value.id == "init_info"
            and isinstance(n.slice, ast.Constant)}
    join = _function(Path(ours.__file__), "join_group", "Peer")
    passed = {k.value for n in ast.walk(join) if isinstance(n, ast.Dict)
              for k in n.keys if isinstance(k, ast.Constant)}
    assert read == passed == {"master_address", "master_port", "world_size"}
    bcast = _function(src["pynccl"], "broadcast", "PyNcclCommunicator")
    assert [a.arg for a in bcast.args.args][:4] == ["self", "tensor", "src", "stream"]
    # what the service sends in init_info must match what the trainer broadcasts
    send = ast.unparse(_function(Path(ours.__file__), "send", "Peer"))
    assert "broadcast(t, src=0, stream=stream)" in send
    update = ast.unparse(_function(Path(ours.__file__), "update", "Peer"))
    assert "packed=False" in update  # one-by-one broadcast on both sides
