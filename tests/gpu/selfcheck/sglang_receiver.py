"""The engine end of an NCCL weight update, on SGLang's own code: `init_weights_update_group`
(-> `init_custom_process_group`) and `receive_weights_from_distributed`, copied unchanged from
the released SGLang by extract_sglang.py, behind the HTTP surface our service gives the trainer:

    python -m selfcheck.sglang_receiver SGLANG_MODULE PORT

- `GET /v1/version` -> {"version", "engine": {"engine_world_size": 1, "engine_world_size_from":
  "server", "nccl_group", "nccl_version"}} (what services/engines report);
- `POST /v1/weights` (format nccl): joins the group as rank `rank_offset` when `init_group`
  (destroying the previous one first, as the service does), receives every bucket in order,
  records each tensor's checksum; answers 200 {"version", "ok": true};
- `GET /_received` -> {"inits", "versions": {version: {name: checksum}}}.

Like SGLang's scheduler it has a default process group (world size 1) of its own before any
update group (`init_weights_update_group` asserts one). stdlib HTTP: the lent GPU machine has
no web framework, and this is a test harness, not the service.
"""

from __future__ import annotations

import datetime
import json
import os
import runpy
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from protocol.messages import WeightUpdate
from protocol.weights import NcclSpec
from selfcheck.common import checksum, mode

STATE: dict[str, Any] = {"version": 0, "key": None, "inits": 0, "versions": {}}
LOCK = threading.Lock()  # one update at a time, as the service serialises them


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _engine_info() -> dict[str, Any]:
    nccl = (".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available()
            else None)
    return {"engine_world_size": 1, "engine_world_size_from": "server",
            "nccl_group": STATE["key"], "nccl_version": nccl}


def make_handler(updater: Any) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet: the driver keeps stderr
            pass

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path == "/v1/version":
                self._answer(200, {"version": STATE["version"], "ready": True,
                                   "engine": _engine_info()})
            elif self.path == "/_received":
                self._answer(200, {"inits": STATE["inits"], "versions": STATE["versions"]})
            else:
                self._answer(404, {"detail": self.path})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/v1/weights":
                self._answer(404, {"detail": self.path})
                return
            body = self.rfile.read(int(self.headers["Content-Length"]))
            update = WeightUpdate.model_validate_json(body)
            with LOCK:
                status, answer = receive(updater, update)
            self._answer(status, answer)

    return Handler


def receive(updater: Any, update: WeightUpdate) -> tuple[int, dict[str, Any]]:
    spec = NcclSpec.model_validate(update.meta["nccl"])
    host, port = update.location.rsplit(":", 1)
    key = f"{update.location}/{spec.group_name}x{spec.world_size}"
    if spec.init_group:
        updater.destroy_weights_update_group(spec.group_name)  # (False, ...) when none yet
        ok, msg = updater.init_weights_update_group(host, int(port), spec.rank_offset,
                                                    spec.world_size, spec.group_name,
                                                    backend=spec.backend)
        if not ok:
            return 500, {"detail": msg, "version": STATE["version"]}
        STATE["key"] = key
        STATE["inits"] += 1
    elif STATE["key"] != key:
        return 409, {"detail": f"no group {key}", "version": STATE["version"]}
    got: dict[str, str] = {}
    for b in spec.buckets:
        for name, t in updater.receive_weights_from_distributed(
                names=b.names, dtypes=b.dtypes, shapes=b.shapes, group_name=spec.group_name):
            got[name] = checksum(t)
    STATE["versions"][str(update.version)] = got
    STATE["version"] = update.version
    return 200, {"version": update.version, "ok": True}


def main(argv: list[str]) -> None:
    sglang = runpy.run_path(argv[0])
    m = mode()
    if not m.cpu:
        torch.cuda.set_device(0)
    # the server's own default group (SGLang's TP group), world size 1
    torch.distributed.init_process_group(
        m.backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
        timeout=datetime.timedelta(seconds=120))
    updater = sglang["WeightUpdater"]()
    updater._model_update_group = {}
    updater.tp_rank = 0
    updater.device = m.device
    server = ThreadingHTTPServer(("127.0.0.1", int(argv[1])), make_handler(updater))
    print(f"sglang receiver {sglang['SGLANG_VERSION']} on {server.server_address}, pid "
          f"{os.getpid()}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
