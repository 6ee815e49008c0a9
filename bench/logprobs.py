"""Peak memory of per-token log-probs: ours (trainer.algorithm.logprobs_from_hidden, chunked +
checkpointed) vs the naive `log_softmax(logits.float(), -1).gather(...)`, forward + backward.

Qwen's vocabulary (V = 151,936), T = 4,096 tokens, batch 1, a random last hidden state and
lm_head (H = 256 by default: the lm_head's own size is the same for both variants and only
dilutes the ratio). Each variant runs in a fresh subprocess, so its peak is its own:
torch.cuda.max_memory_allocated on a GPU, else the process's peak RSS (ru_maxrss), which
includes the Python + torch runtime and the inputs for both. The results are checked equal.

    python bench/logprobs.py [--T 4096] [--V 151936] [--H 256] [--chunk 256] [--forward-only]

Writes its section of docs/benchmarks.md and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NAME = "logprobs"


def rss_mib() -> float:
    """Current resident set size (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(args: argparse.Namespace) -> None:
    """One variant in this process: set up, run, report peak memory, save the outputs."""
    import torch
    import torch.nn.functional as F

    from trainer.algorithm import logprobs_from_hidden

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hidden = torch.randn(args.T, args.H, device=dev).requires_grad_(True)
    weight = (torch.randn(args.V, args.H, device=dev) * args.H**-0.5).requires_grad_(True)
    labels = torch.randint(0, args.V, (args.T,), device=dev)
    upstream = torch.randn(args.T, device=dev)  # d loss / d logprob, like a PPO loss would give
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        setup = torch.cuda.memory_allocated() / 2**20
    else:
        setup = rss_mib()

    t0 = time.perf_counter()
    if args.worker == "naive":
        logits = F.linear(hidden, weight)
        lp = torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None]).squeeze(-1)
    else:
        lp, _ = logprobs_from_hidden(hidden, weight, labels, chunk_size=args.chunk)
    if not args.forward_only:
        (lp * upstream).sum().backward()
    if dev == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0

    if dev == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = {"logprobs": lp.detach().cpu()}
    if not args.forward_only:
        out["hidden_grad"] = hidden.grad.cpu()
        out["weight_grad_rows"] = weight.grad[labels[:256]].cpu()  # rows that get the big grads
        out["weight_grad_norm"] = weight.grad.norm().cpu()
    torch.save(out, args.out)
    print(json.dumps({"peak_mib": peak, "setup_mib": setup, "seconds": seconds, "device": dev}))


def run_variant(variant: str, args: argparse.Namespace, out: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--out", out]
    cmd += ["--T", str(args.T), "--V", str(args.V), "--H", str(args.H), "--chunk", str(args.chunk)]
    if args.forward_only:
        cmd.append("--forward-only")
    res = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    if res.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def write_section(body: str) -> None:
    """Replace this bench's section of docs/benchmarks.md (create the file or section)."""
    path = ROOT / "docs" / "benchmarks.md"
    start, end = f"<!-- bench:{NAME} -->", f"<!-- /bench:{NAME} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--V", type=int, default=151_936)
    p.add_argument("--H", type=int, default=256)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--forward-only", action="store_true")
    p.add_argument("--worker", choices=["naive", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        ours = run_variant("ours", args, f"{tmp}/ours.pt")
        ref = run_variant("naive", args, f"{tmp}/naive.pt")
        a, b = torch.load(f"{tmp}/ours.pt"), torch.load(f"{tmp}/naive.pt")
    diffs = {k: float((a[k] - b[k]).abs().max()) for k in a}
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)

    what = "forward" if args.forward_only else "forward + backward"
    unit = "MiB peak GPU memory" if ours["device"] == "cuda" else "MiB peak RSS"
    share = ours["peak_mib"] / ref["peak_mib"]
    rows = [
        ("ours (chunked + checkpoint)", ours),
        ("naive log_softmax(logits.float()).gather", ref),
    ]
    table = "\n".join(
        f"| {n} | {r['peak_mib']:,.0f} | {r['peak_mib'] - r['setup_mib']:,.0f} | {r['seconds']:.1f} |"
        for n, r in rows
    )
    body = f"""## logprobs: memory of per-token log-probs (`bench/logprobs.py`)

{what}, T = {args.T:,}, V = {args.V:,}, H = {args.H}, batch 1, float32, chunk {args.chunk}, on
{ours["device"]}. Each variant in a fresh process; peak = {unit} (on CPU this includes the
Python + torch runtime and the inputs, the same for both). Results equal (max abs diff:
{", ".join(f"{k} {v:.1e}" for k, v in diffs.items())}).

| variant | peak (MiB) | above setup (MiB) | time (s) |
|---|---:|---:|---:|
{table}

Ours peaks at **{share:.0%}** of the naive peak (goal: at most 25%).
"""
    write_section(body)
    print(
        json.dumps(
            {
                "bench": NAME,
                "ours": round(ours["peak_mib"], 1),
                "reference": round(ref["peak_mib"], 1),
                "unit": unit,
                "ratio": round(ref["peak_mib"] / ours["peak_mib"], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
