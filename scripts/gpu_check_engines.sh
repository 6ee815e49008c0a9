#!/usr/bin/env bash
# A full GPU node (sglang and vllm installed, a model on disk): start a real SGLang and a real
# vLLM server on a small model, run tests/gpu/test_real_engines.py against them
# (generation/scoring, disk updates, and an NCCL push through our own service from the
# production trainer code to each, checked by the weight canary), stop them.
# Usage: RLRT_GPU_MODEL=/path/to/small-hf-model scripts/gpu_check_engines.sh   (tests/gpu/README.md;
#        the bare-machine check is scripts/gpu_check.sh)
# PYTHON runs the tests and plays the trainer: it needs rlrt and vllm (the trainer image pin).
set -euo pipefail
: "${RLRT_GPU_MODEL:?set RLRT_GPU_MODEL to a small HF model directory (e.g. Qwen3-0.6B)}"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SGLANG_PYTHON=${SGLANG_PYTHON:-$PY}
VLLM_PYTHON=${VLLM_PYTHON:-$PY}
SGLANG_PORT=${SGLANG_PORT:-30000}
VLLM_PORT=${VLLM_PORT:-8000}
FRACTION=${GPU_MEM_FRACTION:-0.3}
LOG_DIR=${LOG_DIR:-/tmp/rlrt-gpu-check}
mkdir -p "$LOG_DIR"
# The trainer (pytest) and both servers share this one GPU, and NCCL refuses a communicator
# with two ranks on one device of one host ("Duplicate GPU detected", src/init.cc): each
# process gets its own NCCL_HOSTID, so NCCL sees three hosts and joins them over its socket
# transport (on loopback: they are one machine).
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-lo}

# The versions docs/deploy.md supports (the image pins): say so when these differ.
want_sglang=$(sed -n 's/^ARG SGLANG_IMAGE=.*:v\([0-9][0-9.]*\)$/\1/p' deploy/docker/rollout.Dockerfile)
want_vllm=$(sed -n 's/^ARG VLLM_VERSION=\([0-9][0-9.]*\)$/\1/p' deploy/docker/trainer.Dockerfile)
have() { "$1" -c "import importlib.metadata as m; print(m.version('$2'))" 2>/dev/null || echo none; }
for pair in "$SGLANG_PYTHON sglang $want_sglang" "$VLLM_PYTHON vllm $want_vllm" "$PY vllm $want_vllm"; do
    read -r py pkg want <<<"$pair"
    got=$(have "$py" "$pkg")
    [ "$got" = "$want" ] || echo "WARNING: $py has $pkg $got; the supported version is $want"
done

NCCL_HOSTID=rlrt-gpu-check-sglang "$SGLANG_PYTHON" -m sglang.launch_server --model-path "$RLRT_GPU_MODEL" --host 127.0.0.1 \
    --port "$SGLANG_PORT" --mem-fraction-static "$FRACTION" --context-length 4096 --dp-size 1 \
    >"$LOG_DIR/sglang.log" 2>&1 &
SGLANG_PID=$!
NCCL_HOSTID=rlrt-gpu-check-vllm VLLM_SERVER_DEV_MODE=1 "$VLLM_PYTHON" -m vllm.entrypoints.openai.api_server \
    --model "$RLRT_GPU_MODEL" --host 127.0.0.1 --port "$VLLM_PORT" \
    --gpu-memory-utilization "$FRACTION" --max-model-len 4096 \
    --weight-transfer-config '{"backend":"nccl"}' >"$LOG_DIR/vllm.log" 2>&1 &
VLLM_PID=$!
cleanup() { kill "$SGLANG_PID" "$VLLM_PID" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT

wait_up() {  # url pid name
    for _ in $(seq 1 600); do
        if curl -sf "$1/health" >/dev/null 2>&1; then return 0; fi
        if ! kill -0 "$2" 2>/dev/null; then
            echo "$3 exited; log tail:"; tail -50 "$LOG_DIR/$3.log"; return 1
        fi
        sleep 1
    done
    echo "$3 not up after 600 s"; tail -50 "$LOG_DIR/$3.log"; return 1
}
wait_up "http://127.0.0.1:$SGLANG_PORT" "$SGLANG_PID" sglang
wait_up "http://127.0.0.1:$VLLM_PORT" "$VLLM_PID" vllm

NCCL_HOSTID=rlrt-gpu-check-trainer \
RLRT_SGLANG_URL="http://127.0.0.1:$SGLANG_PORT" RLRT_VLLM_URL="http://127.0.0.1:$VLLM_PORT" \
    "$PY" -m pytest -m gpu tests/gpu -o addopts="" -p no:cacheprovider -v "$@"
