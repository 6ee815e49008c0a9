"""The self-contained GPU check (scripts/gpu_check.sh, tests/gpu/README.md): the trainer's own
code paths on one bare GPU -- ZeRO 0/2/3 steps, the weight canary, `push_buckets` over NCCL into
SGLang's own receive code, the bound default group -- with a random Qwen3 and no downloads.
`--cpu` runs the same paths over gloo (CI, .ci/run). `run.py` drives them and writes the JSON."""
