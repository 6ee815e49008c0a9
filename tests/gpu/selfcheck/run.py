"""The GPU check's driver (scripts/gpu_check.sh calls it): builds the random Qwen3s, runs each
part in its own processes, judges, writes one JSON file and exits non-zero when any check
failed (or could not run). No pytest: the lent GPU machine runs it as it is.

    python -m selfcheck.run [--cpu] --sglang FILE --out FILE [--work DIR] [--only PART ...]

Checks (tests/gpu/README.md): zero{0,2,3}_update, canary_bf16 (canary_fp32 with --cpu),
push_new_group, push_reused_group, bound_default_group, bound_default_group_negative_control.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from protocol.canary import Canary, compare, tolerance_for
from selfcheck.common import Mode, save_random_qwen3
from selfcheck.compare import judge, update_agreement
from selfcheck.procs import answer, start, stop, wait_http
from trainer.dist import free_port as _free_port

STAGES = (0, 2, 3)
MODEL = {"layers": 4}  # ZeRO and the push: several layers, small width, the real vocabulary
# the canary: Qwen3-0.6B's depth, where bf16 error accumulates, with log-probs spread like a
# trained model's (common.qwen3_config)
DEEP = {"layers": 28, "init_std": 0.2}
PARTS = ("training", "push", "bound")
TRAIN_TIMEOUT_S, PUSH_TIMEOUT_S, BOUND_TIMEOUT_S = 420, 180, 120


def check_training(m: Mode, work: Path) -> list[dict[str, Any]]:
    """ZeRO 0/2/3 on the device against stage 0 in fp32 on CPU; the canary of the deep model
    in the device's precision against fp32 (both from the trainer's own code, train.py)."""
    model = save_random_qwen3(work / "model", **MODEL)
    deep = save_random_qwen3(work / "deep", seed=1, **DEEP)
    (work / "ref").mkdir()
    (work / "dev").mkdir()
    ref_p = start("train", "cpu", work / "ref", model, deep, 0, cpu=True, hostid="train-ref",
                  log_dir=work)
    dev_p = start("train", m.device, work / "dev", model, deep, *STAGES, cpu=m.cpu,
                  hostid="train-dev", log_dir=work)
    try:
        ref, dev = answer(ref_p, TRAIN_TIMEOUT_S), answer(dev_p, TRAIN_TIMEOUT_S)
    finally:
        stop(ref_p)
        stop(dev_p)
    init = load_file(str(model / "model.safetensors"))
    ref_w = load_file(str(work / "ref" / "stage0.safetensors"))
    out = []
    for s in STAGES:
        got = dev["stages"][str(s)]
        agree = update_agreement(init, load_file(str(work / "dev" / f"stage{s}.safetensors")),
                                 ref_w, m.dtype)
        out.append({**judge(s, agree, got["losses"], ref["stages"]["0"]["losses"],
                            got["finite"], m.dtype_name), "seconds": got["seconds"]})
    out.append(canary_check(dev["canary"], ref["canary"]))
    return out


def canary_check(dev: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """Would a service serving the fp32 weights accept the device-precision canary? The margin
    is how much of the tolerance the bf16-vs-fp32 difference leaves unused."""
    canary = Canary(sequences=dev["sequences"], logprobs=dev["logprobs"], dtype=dev["dtype"])
    tol = tolerance_for([canary.dtype])
    res = compare(canary, ref["logprobs"], tol)
    return {"name": f"canary_{'fp32' if canary.dtype == 'float32' else 'bf16'}", "ok": res.ok,
            "dtype": canary.dtype, "layers": DEEP["layers"], "max_diff": res.max_diff,
            "tolerance": tol, "margin": tol - res.max_diff,
            "tolerance_over_max_diff": tol / res.max_diff if res.max_diff else None,
            "describe": res.describe()}


def check_push(m: Mode, work: Path, sglang: Path) -> list[dict[str, Any]]:
    """The production push_buckets into SGLang's receive code, a new group then the same."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    recv = start("sglang_receiver", sglang, port, cpu=m.cpu, hostid="rlrt-gpu-check-sglang",
                 log_dir=work)
    try:
        wait_http(f"{url}/v1/version", recv, PUSH_TIMEOUT_S)
        pusher = start("push", url, _free_port(), MODEL["layers"], cpu=m.cpu,
                       hostid="rlrt-gpu-check-trainer", log_dir=work)
        pushes = answer(pusher, PUSH_TIMEOUT_S)["pushes"]
    finally:
        stop(recv)
    out = []
    for p, name, want_new in zip(pushes, ("push_new_group", "push_reused_group"), (True, False),
                                 strict=True):
        problems = []
        if p["succeeded"] != ["rollout"] or p["failed"]:
            problems.append(f"push failed: {p['failed']}")
        if p["new_group"] is not want_new or p["inits"] != 1:
            problems.append(f"group: new={p['new_group']}, receiver inits={p['inits']}")
        if p["checksum_mismatch"]:
            problems.append(f"{len(p['checksum_mismatch'])} tensors differ: "
                            f"{p['checksum_mismatch'][:4]}")
        out.append({**p, "name": name, "ok": not problems, "problems": problems})
    return out


def check_bound(m: Mode, work: Path, sglang: Path, variant: str) -> dict[str, Any]:
    """Two training ranks with a bound default group; rank 0 forms the update group with the
    SGLang peer ("cleared", production) -- or, the negative control ("kept"), shows torch
    would take the split path without the clearing."""
    train, port, group = _free_port(), _free_port(), f"rlrt_weight_sync_bound_{variant}"
    t = BOUND_TIMEOUT_S
    peer = start("bound", "peer", sglang, port, group, t, cpu=m.cpu,
                 hostid=f"rlrt-gpu-check-peer-{variant}", log_dir=work)
    ranks = [start("bound", "rank", train, r, variant, port, group, t, cpu=m.cpu,
                   hostid=f"rlrt-gpu-check-rank{r}-{variant}", log_dir=work) for r in (0, 1)]
    try:
        r0, r1 = (answer(p, t + 30) for p in ranks)
        got = answer(peer, t + 30) if variant == "cleared" else None
    finally:
        for p in (peer, *ranks):
            stop(p)
    problems = []
    if variant == "cleared":
        if r0["split_calls"] != 0:
            problems.append("torch took the split path although the binding was cleared")
        if not (got and got["got"] == r0.get("sent")):
            problems.append(f"broadcast: sent {r0.get('sent')}, peer got {got}")
        if r0["bound"] in ("None", "") or r0["bound"] != r1["bound"]:
            problems.append(f"default group binding not restored: {r0['bound']} / {r1['bound']}")
        name = "bound_default_group"
    else:
        if r0["split_calls"] < 1:
            problems.append("negative control: torch did not reach the split path, so the "
                            "positive check proves nothing")
        name = "bound_default_group_negative_control"
    return {"name": name, "ok": not problems, "problems": problems, "rank0": r0, "rank1": r1,
            "peer": got}


def environment(m: Mode) -> dict[str, Any]:
    def ver(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mode": "cpu" if m.cpu else "gpu", "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        **{p: ver(p) for p in ("deepspeed", "transformers", "pydantic", "safetensors")}}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return env


def write(out: Path, m: Mode, work: Path, results: list[dict[str, Any]], t0: float, *,
          complete: bool) -> None:
    report = {"ok": complete and all(r["ok"] for r in results), "complete": complete,
              "seconds": round(time.perf_counter() - t0, 1), "environment": environment(m),
              "work": str(work), "checks": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="gloo, fp32, no CUDA: the rehearsal")
    ap.add_argument("--sglang", type=Path, required=True,
                    help="SGLang's copied functions (extract_sglang.py's output)")
    ap.add_argument("--out", type=Path, required=True, help="the JSON results")
    ap.add_argument("--work", type=Path, default=None, help="models and role logs (temp dir)")
    ap.add_argument("--only", choices=PARTS, action="append",
                    help="run only these parts (repeatable; default: all)")
    args = ap.parse_args()
    m = Mode(cpu=args.cpu)
    work = args.work or Path(tempfile.mkdtemp(prefix="rlrt-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    if not m.cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu for the rehearsal", file=sys.stderr)
        return 2
    parts: list[tuple[str, Callable[[], Any]]] = [
        ("training", lambda: check_training(m, work)),
        ("push", lambda: check_push(m, work, args.sglang)),
        ("bound", lambda: [check_bound(m, work, args.sglang, "cleared"),
                           check_bound(m, work, args.sglang, "kept")])]
    parts = [(name, run) for name, run in parts if name in (args.only or PARTS)]
    results: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for part, run in parts:
        t0 = time.perf_counter()
        try:
            got = run()
        except Exception as e:  # noqa: BLE001 - a part that cannot run is a failed check
            got = [{"name": part, "ok": False, "problems": [f"{type(e).__name__}: {e}"],
                    "traceback": traceback.format_exc()[-3000:]}]
        for r in got:
            print(f"{'PASS' if r['ok'] else 'FAIL'} {r['name']} "
                  f"{'; '.join(r.get('problems', []))}", flush=True)
        results += got
        print(f"  ({part}: {time.perf_counter() - t0:.0f} s)", flush=True)
        # after every part: a run stopped at its time limit still leaves what it measured
        write(args.out, m, work, results, t_all, complete=part == parts[-1][0])
    ok = bool(results) and all(r["ok"] for r in results)
    print(f"{'ALL PASSED' if ok else 'FAILED'}: {sum(bool(r['ok']) for r in results)}/"
          f"{len(results)} checks; results in {args.out}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
