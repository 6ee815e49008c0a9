"""Contract: our SGLang client (services/engines/sglang.py) and our fake SGLang server
(tests/support/fake_sglang.py) against the released sglang package (the rollout image's pin,
fetched by scripts/fetch-upstream.sh), read with `ast`:

- every route the client calls -- recorded from a real run against the fake, so nothing is
  listed by hand -- and every route the fake serves exists upstream with that method;
- every request field the client sends is a field of the request class upstream's handler
  takes, with a compatible type, and every required field is sent; `sampling_params` keys are
  upstream's SamplingParams (the 0.5.23 schema check refuses others) -- the fake's set equals it;
- every response field the client parses is produced upstream;
- the upstream behaviours the client relies on are still there (the session rule, the
  dp_size assertion, the "not flushed" message, /health generating).
A version bump that breaks one of these fails here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from support import fake_sglang as fake_module
from support import upstream
from support.fake_engines import Fake
from test_sglang_backend import PROMPT, disk_update, engine_for, nccl_update

from protocol.messages import SamplingParams
from services.engines import sglang as client_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def src() -> dict[str, Path]:
    return {
        "http": upstream.source("sglang", "srt/entrypoints/http_server.py"),
        "io": upstream.source("sglang", "srt/managers/io_struct.py"),
        "api": upstream.source("sglang", "api/v1/api_types.py"),
        "updater": upstream.source("sglang", "srt/managers/scheduler_components/weight_updater.py"),
        "control": upstream.source("sglang", "srt/managers/tokenizer_control_mixin.py"),
        "tokenizer": upstream.source("sglang", "srt/managers/tokenizer_manager.py"),
        "args": upstream.source("sglang", "srt/arg_groups/field_order.py"),
    }


def test_the_fetched_sglang_is_the_image_pin() -> None:
    dockerfile = (ROOT / "deploy/docker/rollout.Dockerfile").read_text()
    pin = re.search(r"^ARG SGLANG_IMAGE=lmsysorg/sglang:v([\d.]+)$", dockerfile, re.M)
    assert pin and upstream.version("sglang") == pin.group(1)


# ---------------------------------------------------------------------------- types
def compatible(value: object, ann: str, aliases: dict[str, str]) -> bool:
    """Does a JSON value fit a Python annotation (as upstream writes it)? Unknown names are
    resolved through the module's type aliases; what cannot be resolved is accepted."""
    return _fits(value, ast.parse(ann, mode="eval").body, aliases)


def _fits(v: object, node: ast.expr, aliases: dict[str, str]) -> bool:  # noqa: PLR0911
    if isinstance(node, ast.Constant) and node.value is None:
        return v is None
    if isinstance(node, ast.Name):
        simple = {"int": int, "str": str, "bool": bool, "float": (int, float), "dict": dict,
                  "list": list}
        if node.id in simple:
            t = simple[node.id]
            return isinstance(v, t) and not (node.id in ("int", "float") and isinstance(v, bool))
        if node.id in aliases:
            return compatible(v, aliases[node.id], aliases)
        return True  # Any, or a type we do not model
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _fits(v, node.left, aliases) or _fits(v, node.right, aliases)
    if isinstance(node, ast.Subscript):
        head = ast.unparse(node.value).split(".")[-1]
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if head == "Optional":
            return v is None or _fits(v, args[0], aliases)
        if head == "Union":
            return any(_fits(v, a, aliases) for a in args)
        if head in ("List", "list"):
            return isinstance(v, list) and all(_fits(x, args[0], aliases) for x in v)
        if head in ("Dict", "dict"):
            return isinstance(v, dict)
        if head == "Literal":
            return v in [ast.literal_eval(a) for a in args]
        if head == "Annotated":
            return _fits(v, args[0], aliases)
    return True


def aliases_of(path: Path) -> dict[str, str]:
    out = {}
    for node in upstream.parse(path).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            out[node.targets[0].id] = ast.unparse(node.value)
    return out


def request_class(http: Path, route: str) -> str | None:
    """The class of the handler's body parameter (`obj: X` or `Annotated[X, Body()]`)."""
    fn = upstream.handler(http, route)
    for arg in fn.args.args:
        if arg.annotation is None or arg.arg in ("request", "raw_request"):
            continue
        ann = arg.annotation
        if isinstance(ann, ast.Subscript) and ast.unparse(ann.value) == "Annotated":
            ann = ann.slice.elts[0]  # type: ignore[attr-defined]
        if isinstance(ann, ast.Name) and ann.id.endswith(("ReqInput", "Req")):
            return ann.id
    return None


# ---------------------------------------------------------------------------- the run
@pytest.fixture
async def client_calls(fake_sglang: Fake, model_dir, weights_v1) -> list[dict]:  # noqa: ANN001
    """Every call our client makes, from one run through all of its paths."""
    eng = await engine_for(fake_sglang, model_dir)
    try:
        await eng.generate(PROMPT, 2, SamplingParams(max_new_tokens=3, seed=1, stop_token_ids=[2]))
        await eng.score([PROMPT], [2])
        await eng.health()
        fake_sglang.config(busy_flushes=1)
        await eng.update_weights(disk_update(weights_v1))
        fake_sglang.server.unflushed_next = 1
        await eng.update_weights(disk_update(weights_v1).model_copy(update={"version": 2}))
        await eng.update_weights(nccl_update(3, model_dir))
        fake_sglang.server.session = True  # a stale session: end + begin again
        await eng.update_weights(nccl_update(4, model_dir, init=False))
    finally:
        await eng.close()
    calls = [c for c in fake_sglang.calls() if not c["path"].startswith("/_fake")]
    assert {c["path"] for c in calls} >= {"/generate", "/model_info", "/server_info",
                                          "/begin_weight_update", "/end_weight_update",
                                          "/update_weights_from_distributed",
                                          "/update_weight_version"}
    return calls


async def test_every_route_the_client_calls_exists_upstream(client_calls, src) -> None:
    table = upstream.routes(src["http"])
    for c in client_calls:
        assert c["path"] in table, f"sglang {upstream.version('sglang')} has no {c['path']}"
        assert c["method"] in table[c["path"]], f"{c['method']} {c['path']}: upstream {table[c['path']]}"


def test_every_route_the_fake_serves_exists_upstream(fake_sglang: Fake, src) -> None:
    table = upstream.routes(src["http"])
    served = {}
    for r in fake_sglang.server.app.routes:
        path = getattr(r, "path", "")
        if path.startswith("/_fake") or not isinstance(r, APIRoute):
            continue  # the fake's test controls, FastAPI's own /docs and /openapi.json
        served[path] = set(r.methods) - {"HEAD", "OPTIONS"}
    assert "/get_weight_version" not in table  # the 0.5.23 fact behind the fix
    for path, methods in served.items():
        assert path in table, f"the fake serves {path}; sglang {upstream.version('sglang')} does not"
        assert methods <= table[path], f"{path}: fake {methods}, upstream {table[path]}"


async def test_every_request_field_fits_upstream(client_calls, src) -> None:
    io_aliases = aliases_of(src["io"])
    for c in client_calls:
        body = c.get("body")
        cls = request_class(src["http"], c["path"])
        if c["path"] == "/generate":
            cls = "GenerateReqInput"
        if cls is None:
            assert not body, f"{c['path']} takes no body upstream; we send {body}"
            continue
        fields = upstream.fields(src["io"], cls)
        body = body or {}
        for key, value in body.items():
            assert key in fields, f"{c['path']}: {key!r} is not a field of {cls}"
            assert compatible(value, fields[key]["type"], io_aliases), (
                f"{c['path']}: {key}={value!r} does not fit {fields[key]['type']}")
        missing = [k for k, f in fields.items() if f["required"] and k not in body]
        assert not missing, f"{c['path']}: required {missing} not sent"


async def test_sampling_params_are_upstreams(client_calls, src) -> None:
    allowed = upstream.fields(src["api"], "SamplingParams")
    aliases = aliases_of(src["api"])
    sent = [c["body"]["sampling_params"] for c in client_calls if c["path"] == "/generate"]
    for sp in sent:
        for one in sp if isinstance(sp, list) else [sp]:
            for key, value in one.items():
                assert key in allowed, f"sampling_params.{key} is refused by the 0.5.23 schema"
                assert compatible(value, allowed[key]["type"], aliases), (key, value)
    # the generate contract gate too: every top-level key we send is in its schema
    gate = upstream.fields(src["api"], "GenerateRequest")
    for c in client_calls:
        if c["path"] == "/generate":
            assert set(c["body"]) <= set(gate), set(c["body"]) - set(gate)


def test_the_fakes_sampling_keys_equal_upstreams(src) -> None:
    assert fake_module.SAMPLING_KEYS == set(upstream.fields(src["api"], "SamplingParams"))


def quoted(key: str, text: str) -> bool:
    return re.search(rf"""['"]{re.escape(key)}['"]""", text) is not None


def test_response_fields_we_parse_are_produced_upstream(src) -> None:
    model_info = ast.unparse(upstream.handler(src["http"], "/model_info"))
    assert quoted("weight_version", model_info)
    # /server_info is the resolved server args: the two we read are fields of them
    order = src["args"].read_text()
    for key in ("dp_size", "tp_size", "pp_size", "enable_deterministic_inference"):
        assert quoted(key, order), f"/server_info has no {key}"
    # /generate's meta_info, built by the tokenizer manager
    tm = src["tokenizer"].read_text()
    for key in ("output_token_logprobs", "input_token_logprobs", "finish_reason",
                "weight_version", "prompt_tokens", "cached_tokens"):
        assert quoted(key, tm), f"meta_info.{key} is no longer produced"
    # update replies: {"success", "message"}
    for route in ("/update_weights_from_disk", "/update_weights_from_distributed",
                  "/init_weights_update_group", "/begin_weight_update", "/end_weight_update"):
        assert quoted("success", ast.unparse(upstream.handler(src["http"], route))), route


def test_the_behaviours_we_rely_on_are_still_upstream(src) -> None:
    updater = src["updater"].read_text()
    flat = re.sub(r'"\s*\n\s*"', "", updater)  # join implicitly concatenated literals
    # distributed updates need a begin/end session; the texts the client and fake use
    assert fake_module.NO_SESSION in flat
    assert fake_module.SESSION_OPEN in flat and fake_module.NO_SESSION_TO_END in flat
    assert client_module.SESSION_OPEN in flat
    # a 400 that means "updated, cache not flushed"
    assert fake_module.NOT_FLUSHED in flat and client_module.NOT_FLUSHED in flat
    # NCCL needs dp_size 1 (the reason for one server per replica)
    init = ast.unparse(next(n for n in ast.walk(upstream.parse(src["control"]))
                            if isinstance(n, ast.AsyncFunctionDef)
                            and n.name == "init_weights_update_group"))
    assert "dp_size == 1" in init
    # /health generates a token (503 while paused): why our probe reads /model_info, and why
    # the rollout image turns that generation off for /health (not /health_generate)
    health = ast.unparse(upstream.handler(src["http"], "/health"))
    assert "GenerateReqInput" in health and "503" in health
    switch = "SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"
    assert f"{switch}.get()" in health and "'/health'" in health
    assert switch in upstream.source("sglang", "srt/environ.py").read_text()
    assert f"{switch}=false" in (ROOT / "deploy/docker/rollout.Dockerfile").read_text()
    # the server's side of the rendezvous wraps the store (tests/test_nccl_rendezvous.py)
    common = ast.unparse(next(n for n in upstream.parse(upstream.source(
        "sglang", "srt/utils/common.py")).body if isinstance(n, ast.FunctionDef)
        and n.name == "init_custom_process_group"))
    assert "PrefixStore(group_name, store)" in common
