"""What our rollout path costs on top of a real vLLM server, and vLLM-CPU beside our CPU engine.

Workload (RL-shaped, the main job's): P prompts of 32-128 random token ids, G = 8 samples each,
temperature 1, up to 64 new tokens, stop at EOS, per-token log-probs; then teacher scoring of
every (prompt + response) sequence (prompt log-probs of the whole sequence).

Sides, on one vLLM server per model (vllm-cpu in .venv-vllm, float32, --enforce-eager):
- raw: the same /v1/completions bodies our client builds, all P sent at once with httpx;
- ours: P `PromptTask`s published on the bus (embedded Redis) and consumed by our rollout
  service (serve_rollout, in this process, concurrency P, `VLLMEngine`) until P `RolloutGroup`s
  are back; scoring through our `VLLMEngine.score` (the teacher service's engine call);
- cpu: our built-in `CpuEngine` on the same prompts (generation), in this process.
Scoring raw is measured twice: with the requests the teacher service sends (one per group of
G, all at once: the service's overhead) and packed up to the token budget (the engine's best
case, which scoring one group per message cannot reach). The whole workload runs once as a
warm-up, then `--rounds` interleaved rounds; each side keeps its best.
No per-request seeds on the vLLM sides: vLLM-CPU 0.32's engine core dies ("CPU Generator does
not use offset") when seeded requests have their prefill chunked, i.e. when several arrive at
once (docs/engines.md); tokens/s is therefore over different (equally distributed) samples.
Goal (the CPU proxy of the GPU goal >= 0.95x raw SGLang): ours >= 0.9x raw tokens/s.

Models (random init, built in a temp dir): "tiny" = the bootstrap model's shape (Qwen3, hidden
64, 4 layers, 2 heads of 32, vocab 130, its tokenizer); "135M" = SmolLM2-135M's shape (Llama,
hidden 576, 30 layers, 9 heads / 3 KV heads, vocab 49152, a word-level tokenizer of that size).

    python bench/engine_overhead.py [--prompts 16] [--big-prompts 8] [--skip-big] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._report import emit, record  # noqa: E402
from protocol.bus import Bus  # noqa: E402
from protocol.config import BusSettings  # noqa: E402
from protocol.messages import PromptTask, RolloutGroup, SamplingParams  # noqa: E402
from rlrt.engine_servers import VLLMServer  # noqa: E402
from rlrt.processes import free_port  # noqa: E402
from rlrt.redis_server import EmbeddedRedis  # noqa: E402
from services.engines.config import VLLM_CPU_ARGS, EngineConfig, EngineLaunch  # noqa: E402
from services.engines.factory import make_engine  # noqa: E402

NAME = "engine_overhead"
G = 8
MAX_NEW = 64
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"


# ------------------------------------------------------------------------------ models
def tiny_model(out: Path) -> tuple[Path, int]:
    from trainer.bootstrap.model import build_model
    from trainer.bootstrap.tokenizer import build_tokenizer

    tok = build_tokenizer()
    build_model(tok, seed=0).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out, int(tok.eos_token_id)


def big_model(out: Path) -> tuple[Path, int]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = 49152
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t3"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="t1", pad_token="t0", unk_token="t3")
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      rope_theta=100000.0, tie_word_embeddings=True, eos_token_id=1, pad_token_id=0,
                      bos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out, 1


def workload(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lo = 8 if vocab > 1000 else 40  # clear of special tokens
    return [torch.randint(lo, vocab, (int(torch.randint(32, 129, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


def params(eos: int, seed: int | None = None) -> SamplingParams:
    return SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0, top_k=-1,
                          stop_token_ids=[eos], seed=seed)


# ------------------------------------------------------------------------------ sides
async def raw_generate(url: str, model: str, prompts: list[list[int]], eos: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=1800) as c:
        async def one(i: int, p: list[int]) -> int:
            sp = params(eos)
            body = {"model": model, "prompt": p, "n": G, "max_tokens": sp.max_new_tokens,
                    "temperature": sp.temperature, "top_p": sp.top_p, "top_k": sp.top_k,
                    "logprobs": 0, "return_tokens_as_token_ids": True,
                    "stop_token_ids": sp.stop_token_ids}
            r = await c.post("/v1/completions", json=body)
            r.raise_for_status()
            return sum(len(ch["logprobs"]["tokens"]) for ch in r.json()["choices"])

        t0 = time.perf_counter()
        toks = await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
        return {"seconds": time.perf_counter() - t0, "tokens": sum(toks)}


async def ours_generate(url: str, model_dir: Path, prompts: list[list[int]], eos: int,
                        redis_url: str) -> dict:
    from services.rollout.config import RolloutConfig
    from services.rollout.main import serve_rollout

    bus_cfg = BusSettings(redis_url=redis_url, prefix=f"bench{time.time_ns()}")
    port = free_port()
    cfg = RolloutConfig(port=port, engine=EngineConfig(kind="vllm", url=url, model_path=str(model_dir)),
                        consumer="bench", concurrency=len(prompts))
    bus = Bus.from_url(redis_url, bus_cfg)
    stop = asyncio.Event()
    svc = asyncio.create_task(serve_rollout(cfg, bus_cfg, stop))
    async with httpx.AsyncClient(timeout=5) as c:  # ready = engine connected
        while True:
            if svc.done():
                svc.result()
            try:
                if (await c.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.05)
    got: list[RolloutGroup] = []

    async def handler(m: RolloutGroup) -> None:
        got.append(m)

    try:
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            await bus.publish(bus_cfg.stream("prompts"), PromptTask(
                run_id="bench", prompt_id=f"p{i}", prompt_text="", prompt_ids=np.asarray(p),
                answer="", group_size=G, sampling=params(eos)))
        await bus.consume(bus_cfg.stream("rollouts"), "bench-reader", "r", handler, RolloutGroup,
                          asyncio.Event(), max_messages=len(prompts))
        dt = time.perf_counter() - t0
    finally:
        stop.set()
        await asyncio.wait_for(svc, 60)
        await bus.close()
    tokens = sum(len(r.token_ids) for g in got for r in g.responses)
    return {"seconds": dt, "tokens": tokens, "groups": got}


async def raw_score(url: str, model: str, seqs: list[list[int]], budget: int | None) -> float:
    """Prompt log-probs of `seqs` straight from the server. budget None: one request per group
    of G sequences, all at once -- the requests the teacher service sends (it scores one group
    per message); else packed into as few requests as the token budget allows (the engine's
    best case, which one group per message cannot reach)."""
    async with httpx.AsyncClient(base_url=url, timeout=1800) as c:
        if budget is None:
            chunks = [seqs[i:i + G] for i in range(0, len(seqs), G)]
        else:
            chunks, cur, size = [], [], 0
            for s in seqs:
                if cur and size + len(s) > budget:
                    chunks.append(cur)
                    cur, size = [], 0
                cur.append(s)
                size += len(s)
            chunks.append(cur)
        t0 = time.perf_counter()
        rs = await asyncio.gather(*[c.post("/v1/completions", json={
            "model": model, "prompt": ch, "max_tokens": 1, "temperature": 0.0,
            "prompt_logprobs": 0}) for ch in chunks])
        for r in rs:
            r.raise_for_status()
        return time.perf_counter() - t0


async def ours_score(url: str, model_dir: Path, seqs: list[list[int]], offsets: list[int],
                     budget: int) -> float:
    eng = await make_engine(EngineConfig(kind="vllm", url=url, model_path=str(model_dir),
                                         max_tokens_per_request=budget))
    try:
        t0 = time.perf_counter()
        # the teacher service scores one group per call, all groups concurrently
        await asyncio.gather(*[eng.score(seqs[i:i + G], offsets[i:i + G])
                               for i in range(0, len(seqs), G)])
        return time.perf_counter() - t0
    finally:
        await eng.close()


async def cpu_generate(model_dir: Path, prompts: list[list[int]], eos: int, threads: int) -> dict:
    from services.engines.cpu import CpuEngine

    eng = CpuEngine(str(model_dir), num_threads=threads)
    try:
        await eng.generate(prompts[0][:8], 2, SamplingParams(max_new_tokens=4))  # warm-up
        t0 = time.perf_counter()
        res = await asyncio.gather(*[eng.generate(p, G, params(eos, i)) for i, p in enumerate(prompts)])
        return {"seconds": time.perf_counter() - t0,
                "tokens": sum(len(o.token_ids) for r in res for o in r)}
    finally:
        await eng.close()


# ------------------------------------------------------------------------------ one model
def bench_model(label: str, build, n: int, threads: int, tmp: Path, redis_url: str,  # noqa: ANN001
                rounds: int = 2) -> dict:
    model_dir, eos = build(tmp / label.split()[0])
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(str(model_dir)).vocab_size
    prompts = workload(vocab, n)
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", "OMP_NUM_THREADS": str(threads)}
    srv = VLLMServer(f"bench-{label.split()[0]}", EngineLaunch(
        python=str(VLLM_PY), args=[*VLLM_CPU_ARGS], env=env), model_dir, tmp / f"{label.split()[0]}.log")
    srv.check()
    t0 = time.perf_counter()
    srv.start()
    try:
        srv.wait_ready()
        start_s = time.perf_counter() - t0
        name = httpx.get(f"{srv.url}/v1/models", timeout=30).json()["data"][0]["id"]

        def best(runs: list[dict]) -> dict:
            return max(runs, key=lambda r: r["tokens"] / r["seconds"])

        async def go() -> dict:
            # Warm-up: the whole workload once, both calls. vLLM-CPU's first batches of a new
            # shape are slow (kernel selection, allocations): with only a one-prompt warm-up,
            # whichever side ran first paid for it -- raw did, and ours read 1.55x of raw.
            warm = await raw_generate(srv.url, name, prompts, eos)
            raws, ourses, score = [], [], {"raw": [], "packed": [], "ours": []}
            seqs, offs = [], []
            for _ in range(rounds):  # interleaved, each side's best round
                raws.append(await raw_generate(srv.url, name, prompts, eos))
                ourses.append(await ours_generate(srv.url, model_dir, prompts, eos, redis_url))
                if not seqs:
                    got = sorted(ourses[0]["groups"], key=lambda g: int(g.task.prompt_id[1:]))
                    for i, g in enumerate(got):
                        for r in g.responses:
                            seqs.append(prompts[i] + r.token_ids.tolist())
                            offs.append(len(prompts[i]))
                    await raw_score(srv.url, name, seqs, None)  # warm-up of the scoring shapes
                budget = 16384
                score["raw"].append(await raw_score(srv.url, name, seqs, None))
                score["packed"].append(await raw_score(srv.url, name, seqs, budget))
                score["ours"].append(await ours_score(srv.url, model_dir, seqs, offs, budget))
            return {"raw": best(raws), "ours": best(ourses), "warm": warm,
                    "rounds": {"raw": raws, "ours": ourses},
                    "score_tokens": sum(len(s) for s in seqs),
                    "raw_score_s": min(score["raw"]), "packed_score_s": min(score["packed"]),
                    "ours_score_s": min(score["ours"]), "score_rounds": score}

        try:
            res = asyncio.run(go())
        except Exception:
            print(f"--- {srv.name} log tail ---\n{srv.child.log_tail(6000) if srv.child else ''}",
                  file=sys.stderr)
            raise
    finally:
        srv.stop()
    cpu = asyncio.run(cpu_generate(model_dir, prompts, eos, threads))
    res.update(label=label, start_s=start_s, cpu=cpu, prompts=n)
    return res


def row(r: dict) -> str:
    raw_tps = r["raw"]["tokens"] / r["raw"]["seconds"]
    ours_tps = r["ours"]["tokens"] / r["ours"]["seconds"]
    cpu_tps = r["cpu"]["tokens"] / r["cpu"]["seconds"]
    sr = r["score_tokens"] / r["raw_score_s"]
    sp = r["score_tokens"] / r["packed_score_s"]
    so = r["score_tokens"] / r["ours_score_s"]
    return (f"| {r['label']} | {r['prompts']}x{G} | {raw_tps:.0f} | {ours_tps:.0f} | "
            f"**{ours_tps / raw_tps:.2f}x** | {sr:.0f} | {sp:.0f} | {so:.0f} | **{so / sr:.2f}x** | "
            f"{so / sp:.2f}x | {cpu_tps:.0f} | {cpu_tps / raw_tps:.2f}x | {r['start_s']:.0f} s |")


def rounds_line(r: dict) -> str:
    """Every round's tokens/s, so the spread is visible next to the best."""
    def tps(runs: list[dict]) -> str:
        return ", ".join(f"{x['tokens'] / x['seconds']:.0f}" for x in runs)

    sc = r["score_rounds"]
    return (f"{r['label']}: generation tok/s by round: raw {tps(r['rounds']['raw'])}; ours "
            f"{tps(r['rounds']['ours'])} (warm-up raw {r['warm']['tokens'] / r['warm']['seconds']:.0f}); "
            "scoring s by round: " + "; ".join(f"{k} " + ", ".join(f"{x:.2f}" for x in v)
                                               for k, v in sc.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16, help="prompts of the tiny model")
    ap.add_argument("--big-prompts", type=int, default=8, help="prompts of the 135M model")
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="threads of the CPU engine and vLLM")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved raw/ours rounds (best kept)")
    ap.add_argument("--note", default="", help="a line recorded with the figures (e.g. machine load)")
    args = ap.parse_args()
    if not VLLM_PY.exists():
        sys.exit("no .venv-vllm: run `bash scripts/setup-vllm.sh` first")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        redis = EmbeddedRedis(Path(tmp) / "redis")
        redis_url = redis.start()
        try:
            results.append(bench_model("tiny (0.2M, bootstrap shape)", tiny_model, args.prompts,
                                       args.threads, Path(tmp), redis_url, args.rounds))
            if not args.skip_big:
                results.append(bench_model("135M (SmolLM2 shape)", big_model, args.big_prompts,
                                           args.threads, Path(tmp), redis_url, args.rounds))
        finally:
            redis.stop()
    load = os.getloadavg()[0]
    body = (
        "Response tokens/s of the RL workload (prompts x 8 samples, <= 64 new tokens, log-probs) "
        "sent straight to a vLLM-CPU server (raw) and through our rollout service and the bus "
        "(ours); teacher scoring (prompt log-probs of every sequence) raw vs our `VLLMEngine`: "
        "raw sends the requests the teacher service sends (one per group of 8, all at once), "
        "raw packed fills each request up to the 16384-token budget (the engine's best case); our "
        "CPU engine on the same prompts. After a warm-up with the whole workload, "
        f"{results[0]['rounds']['raw'].__len__()} interleaved rounds, each side's best. "
        "`python bench/engine_overhead.py`.\n\n"
        "| model | workload | raw vLLM tok/s | ours tok/s | ours/raw | raw score tok/s | "
        "raw packed score tok/s | ours score tok/s | ours/raw | ours/packed | CPU engine tok/s | "
        "CPU/vLLM | vLLM start |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(row(r) for r in results)
        + "\n\n" + "\n".join(f"- {rounds_line(r)}" for r in results)
        + f"\n\n1-minute load average at the end: {load:.1f} on {os.cpu_count()} cores. {args.note}\n")
    record(NAME, body)
    r0 = results[0]
    emit(NAME, r0["ours"]["tokens"] / r0["ours"]["seconds"], r0["raw"]["tokens"] / r0["raw"]["seconds"],
         "tokens/s")


if __name__ == "__main__":
    main()
