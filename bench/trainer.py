"""Trainer benchmarks, in one run on one model, batch and sequence lengths:

  (a) an `rlrt` update vs a `grpo` update on the same batch, teacher log-probs given (teacher
      scoring excluded): the cost of the reversed-teacher re-weighting (goal: <= 1.05x);
  (b) our DeepSpeed update (old log-prob recompute, advantages, micro-batched loss and
      backward, clipping, AdamW step) vs the same update written in plain PyTorch +
      transformers + torch AdamW (tests/support/reference_update.py) (goal: >= 0.9x the
      reference's tokens/s);
  (c) pushing the weights to two services (gather, atomic safetensors directory with sha256
      manifest written once, both services POSTed concurrently, each verifying the hashes and
      loading the weights into its model) vs writing the same tensors once with
      safetensors.save_file (goal: <= 1.5x).

The services of (c) are two real HTTP servers on 127.0.0.1 implementing the documented
POST /v1/weights (the tests' double, tests/support/trainer_standin.py), each with its own
copy of the model. Measurements alternate between the variants and report medians: the
machine is shared.

    python bench/trainer.py [--hidden 384 --layers 4 --vocab 32000 --groups 2 --group-size 8
                             --prompt 32 --response 96 --reps 5 --zero-stage 2]

Headline JSON: (b), update tokens/s, ours vs the plain-PyTorch reference.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402

NAME = "trainer"


def build_model(args: argparse.Namespace, out: Path) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=args.hidden // 64, num_key_value_heads=2,
                      head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True)
    Qwen3ForCausalLM(cfg).save_pretrained(str(out))
    return out


def build_batch(args: argparse.Namespace):  # noqa: ANN201 - a TrainBatch
    """Groups of fixed prompt length, responses of the given mean length (+-25%), about
    half correct, teacher scores on the correct responses of mixed groups (what rlrt gets)."""
    from support.groups import scored_group

    from trainer.batch import build_batch as stack

    rng = np.random.default_rng(0)
    lo, hi = int(args.response * 0.75), int(args.response * 1.25)
    groups = []
    for i in range(args.groups):
        rewards = [float(x) for x in rng.integers(0, 2, args.group_size)]
        rewards[0], rewards[1] = 1.0, 0.0  # mixed: the teacher has work to do
        correct = [k for k, r in enumerate(rewards) if r == 1.0]
        groups.append(scored_group(rewards, rng=rng, vocab=args.vocab, prompt_len=args.prompt,
                                   resp_len=(lo, hi), teacher_rows=correct, task_index=i))
    return stack(groups, version=0, pad_id=0)


def median_time(fn, reps: int) -> float:  # noqa: ANN001
    return statistics.median(_timed(fn) for _ in range(reps))


def _timed(fn) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_updates(args: argparse.Namespace, model_dir: Path) -> dict:
    from support.reference_update import reference_optimizer, reference_update
    from transformers import AutoModelForCausalLM

    from trainer import dist
    from trainer.algorithm import AlgorithmConfig
    from trainer.config import TrainerConfig
    from trainer.model import build_policy
    from trainer.update import update_step

    batch = build_batch(args)
    cfg = TrainerConfig(model_path=str(model_dir), zero_stage=args.zero_stage, lr=1e-6,
                        warmup_steps=0, micro_batch_size=args.micro_batch,
                        logprob_chunk_size=args.chunk)
    rank, world = dist.setup("cpu", 600)
    policy = build_policy(cfg, rank=rank, world_size=world, device="cpu")
    grpo, rlrt = AlgorithmConfig.from_preset("grpo"), AlgorithmConfig.from_preset("rlrt")
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref_model.config.use_cache = False
    opt, sched = reference_optimizer(ref_model, cfg)
    step = [0]

    def ours(alg: AlgorithmConfig, mode: str = "reuse") -> None:
        m = update_step(policy, batch, alg, step=step[0], micro_batch_size=args.micro_batch,
                        old_logprobs_mode=mode)
        step[0] += 1
        if alg is rlrt:
            assert m["reweighted_rows"] > 0  # the teacher weights are really in use

    def reference() -> None:
        reference_update(ref_model, opt, sched, batch, grpo, step=0,
                         micro_batch_size=args.micro_batch, max_grad_norm=cfg.max_grad_norm,
                         chunk_size=args.chunk)

    runs = {"grpo": lambda: ours(grpo), "rlrt": lambda: ours(rlrt),
            "grpo_recompute": lambda: ours(grpo, "recompute"), "reference": reference}
    for fn in runs.values():  # warm-up (allocator, first-call paths)
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.reps):  # interleaved, so machine noise hits every variant alike
        for k, fn in runs.items():
            times[k].append(_timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_s": med, "tokens": batch.num_tokens, "sequences": batch.size,
            "seq_len": int(batch.input_ids.shape[1]), "policy": policy}


def serve_weights(model_dir: str) -> None:
    """`--serve-weights DIR`: one service double in its own process (as real services are):
    POST /v1/weights verifies every file digest and loads the weights into its model."""
    import threading

    from support.trainer_standin import Controls, serve, weights_app
    from transformers import AutoModelForCausalLM

    from protocol.messages import WeightUpdate
    from protocol.weights import load_weights_dir

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def load(u: WeightUpdate) -> None:
        sd = load_weights_dir(u.location, u.sha256)  # every file's digest checked
        model.load_state_dict(sd, strict=False)

    with serve(weights_app(load, Controls(), lambda: 0, "tok")) as url:
        print(url, flush=True)
        threading.Event().wait()


def _start_service(model_dir: str) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, __file__, "--serve-weights", model_dir],
                         stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = p.stdout.readline().strip()
    if not url.startswith("http"):
        p.kill()
        raise RuntimeError("the service double did not start")
    return p, url


def bench_push(args: argparse.Namespace, policy, tmp: Path) -> dict:  # noqa: ANN001
    from safetensors.torch import save_file

    from protocol.weights import blake3_file, save_weights_dir, sha256_file
    from trainer.config import DiskPush, ServiceEndpoint
    from trainer.model import full_state_dict
    from trainer.transports.disk import WeightPusher

    model_dir = str(policy.hf_model.name_or_path)
    procs = [_start_service(model_dir) for _ in range(2)]
    try:
        cfg = DiskPush(services=[ServiceEndpoint(name="rollout", url=procs[0][1]),
                                   ServiceEndpoint(name="teacher", url=procs[1][1])],
                         control_token="tok")
        extra = {"config.json": policy.hf_model.config.to_json_string()}
        pusher = WeightPusher(cfg, tmp / "weights", "bench", extra_files=extra)
        version = [0]
        sd_plain = {k: v.detach().clone() for k, v in full_state_dict(policy).items()}
        nbytes = sum(t.numel() * t.element_size() for t in sd_plain.values())
        parts: dict[str, list[float]] = {"write": [], "notify": []}

        loop = asyncio.new_event_loop()  # the trainer's: one loop, one HTTP client, every push

        def ours() -> None:  # exactly what the trainer does after a step
            version[0] += 1
            res = loop.run_until_complete(pusher.push(full_state_dict(policy, copy=False),
                                                      version[0]))
            assert sorted(res.ok) == ["rollout", "teacher"], res.failed
            parts["write"].append(res.write_s)
            parts["notify"].append(res.notify_s)

        def plain() -> None:
            save_file(sd_plain, str(tmp / "plain.safetensors"))

        def directory() -> None:  # as a push writes it (no fsync: push.fsync false)
            save_weights_dir(sd_plain, tmp / "dir", version=0, extra_files=extra, durable=False)

        def verify_once() -> None:  # what each service must at least do: hash the file
            blake3_file(tmp / "plain.safetensors")

        def verify_sha256() -> None:  # the same with the hash of format 1 (sha256)
            sha256_file(tmp / "plain.safetensors")

        runs = {"push": ours, "write": plain, "write_dir": directory, "hash": verify_once,
                "sha256": verify_sha256}
        for fn in runs.values():
            fn()
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.reps):
            for k, fn in runs.items():
                times[k].append(_timed(fn))
        loop.run_until_complete(pusher.close())
        loop.close()
    finally:
        for p, _ in procs:
            p.kill()
            p.wait()
    med = {k: statistics.median(v) for k, v in times.items()}
    med.update({f"push_{k}": statistics.median(v[1:]) for k, v in parts.items()})
    return {"median_s": med, "bytes": nbytes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--response", type=int, default=96)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--zero-stage", type=int, default=2, choices=[0, 2, 3])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--serve-weights", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 on a shared 2-core box (oversubscribed OpenMP is "
                   "erratic), 0 = torch's default")
    args = p.parse_args()
    if args.serve_weights:
        serve_weights(args.serve_weights)
        return
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from _report import emit, record

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model_dir = build_model(args, tmp / "model")
        up = bench_updates(args, model_dir)
        push = bench_push(args, up.pop("policy"), tmp)

    m, pm = up["median_s"], push["median_s"]
    tok = up["tokens"]
    rlrt_cost = m["rlrt"] / m["grpo"]
    ours_tps, ref_tps = tok / m["grpo"], tok / m["reference"]
    recompute_tps = tok / m["grpo_recompute"]
    push_ratio = pm["push"] / pm["write"]
    push_ratio_dir = pm["push"] / pm["write_dir"]
    floor = (pm["write"] + pm["hash"]) / pm["write"]
    floor_sha = (pm["write"] + pm["sha256"]) / pm["write"]
    body = f"""
Model: Qwen3 architecture, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}
(tied), fp32 ({push['bytes'] / 2**20:.0f} MiB of weights). Batch: {args.groups} groups x
{args.group_size} = {up['sequences']} sequences, prompt {args.prompt} + response ~{args.response}
tokens (padded length {up['seq_len']}), {tok} trained tokens, micro-batch {args.micro_batch}.
Ours: DeepSpeed ZeRO-{args.zero_stage} on CPU (gloo, 1 process), torch AdamW. Medians of
{args.reps} interleaved repetitions after one warm-up.

| | ours | reference | ratio | goal |
|---|---:|---:|---:|---|
| (a) rlrt vs grpo update (s) | {m['rlrt']:.3f} | {m['grpo']:.3f} | {rlrt_cost:.3f}x | <= 1.05x |
| (b) DeepSpeed vs plain PyTorch update (tokens/s) | {ours_tps:,.0f} | {ref_tps:,.0f} | {ours_tps / ref_tps:.3f}x | >= 0.9x |
| (b') same, with a separate old-log-prob pass (tokens/s) | {recompute_tps:,.0f} | {ref_tps:,.0f} | {recompute_tps / ref_tps:.3f}x | >= 0.9x |
| (c) push to 2 services vs one safetensors write (s) | {pm['push']:.3f} | {pm['write']:.3f} | {push_ratio:.2f}x | <= 2.0x |
| (c') same, vs our own write of the weight directory (s) | {pm['push']:.3f} | {pm['write_dir']:.3f} | {push_ratio_dir:.2f}x | (none: a stricter view) |

(a) times our full update step (old log-probs, advantages, loss, backward, step) with each
preset, in the trainer's default mode; teacher log-probs are inputs (scoring is the teacher
service's cost). (b) is the default mode (`old_logprobs: reuse`: s_t taken from the update's
own forward, identical values with one optimizer step per batch, one pass fewer); (b') is the
literal recompute (`old_logprobs: recompute`), the same work as the reference. Ours also
computes the per-token entropy (a logged metric), which the reference skips.

(c) ours = gather + directory write ({pm['push_write']:.3f} s: the safetensors file streamed
from the tensors' memory with its BLAKE3 digest computed alongside on a helper thread,
manifest, atomic rename; pushed directories skip fsync, `push.fsync`) + both services
verifying the digest of every file and loading the weights, over HTTP ({pm['push_notify']:.3f} s;
each service is its own process, as in a run, and maps the file zero-copy while hashing it),
all on one event loop and one HTTP client, as the trainer pushes. The (c) reference is
`safetensors.save_file` of the same tensors (no integrity hash, nothing loaded); (c') writes
the very directory the services load, once, as a push does (no fsync): our streamed writer is
faster than `save_file` ({pm['write_dir']:.3f} s against {pm['write']:.3f} s for the same bytes, the
digest included), so against it the services' part of a push dominates. What a verified push
cannot go below: the services cannot start before the file is complete, and each must hash
all {push['bytes'] / 2**20:.0f} MiB before it may use them (the two at once, one per core): one
write plus one hash, {floor:.2f}x `save_file` with BLAKE3 ({pm['hash']:.3f} s per file),
{floor_sha:.2f}x with sha256 ({pm['sha256']:.3f} s: the file digest of format 1 directories,
with which this push measured 2.1x; protocol/weights.py says why BLAKE3).
In a run the push's load half is also off the critical path (`push.overlap`: the services
load while the trainer starts the next step; the trainer pays only the write).
"""
    record(NAME, body)
    emit(NAME, ours_tps, ref_tps, "tokens/s")


if __name__ == "__main__":
    main()
