#!/bin/sh
# The vLLM server of the teacher service (run by rlrt-with-engine in the rlrt-teacher image).
# vLLM registers its native weight-transfer API (/init_weight_transfer_engine,
# /start_weight_update, /update_weights, /finish_weight_update, /pause, /resume) and the
# /collective_rpc disk fallback only with VLLM_SERVER_DEV_MODE=1, and the NCCL transfer engine
# only with --weight-transfer-config '{"backend":"nccl"}'. Those dev endpoints have no auth:
# the server binds loopback by default, so only the rlrt worker in the same container reaches
# it. (NCCL weight pushes need no inbound connection: the worker drives them through
# these endpoints and the GPU ranks connect out to the trainer.)
#   RLRT_MODEL        HF model id or directory (required)
#   RLRT_ENGINE_PORT  HTTP port (8000; the config's teacher.engine.url must name it)
#   RLRT_ENGINE_HOST  bind address (127.0.0.1; keep it: see above)
#   RLRT_ENGINE_TP    tensor-parallel size = GPUs of this server
#   RLRT_ENGINE_ARGS  more flags, e.g. "--gpu-memory-utilization 0.85 --max-model-len 32768"
#   RLRT_ENGINE_API_KEY  when set, vLLM's API key (VLLM_API_KEY, i.e. --api-key, kept off the
#                     command line): /v1/* needs `Authorization: Bearer <key>` (the worker
#                     sends teacher.engine.api_key). It does NOT guard the dev endpoints above:
#                     keep RLRT_ENGINE_HOST on loopback.
set -eu
: "${RLRT_MODEL:?set RLRT_MODEL to a Hugging Face model id or a model directory}"
export VLLM_SERVER_DEV_MODE=1
if [ -n "${RLRT_ENGINE_API_KEY:-}" ]; then
    export VLLM_API_KEY="$RLRT_ENGINE_API_KEY"
fi
# shellcheck disable=SC2086  # RLRT_ENGINE_ARGS is a list of flags
exec vllm serve "$RLRT_MODEL" \
    --host "${RLRT_ENGINE_HOST:-127.0.0.1}" \
    --port "${RLRT_ENGINE_PORT:-8000}" \
    --tensor-parallel-size "${RLRT_ENGINE_TP:-1}" \
    --weight-transfer-config '{"backend":"nccl"}' \
    ${RLRT_ENGINE_ARGS:-}
