#!/bin/sh
# The SGLang server of the rollout service (run by rlrt-with-engine in the rlrt-rollout image).
# Binds loopback by default: only the rlrt worker in the same container talks to it. Weight
# updates use SGLang's native API (init_weights_update_group + update_weights_from_distributed):
# the server's GPU ranks connect OUT to the trainer's rendezvous (trainer.push.master_address).
#   RLRT_MODEL        HF model id or directory (required)
#   RLRT_ENGINE_PORT  HTTP port (30000; the config's rollout.engine.url must name it)
#   RLRT_ENGINE_HOST  bind address (127.0.0.1: NCCL pushes are driven through our service's
#                     /v1/weights and need no inbound connection to the server)
#   RLRT_ENGINE_TP    tensor-parallel size
#   RLRT_ENGINE_DP    data-parallel replicas; GPUs of this server = TP x DP
#                     (= trainer.push.services[].engine_world_size)
#   RLRT_ENGINE_ARGS  more flags, e.g. "--mem-fraction-static 0.85 --context-length 16384"
#   RLRT_ENGINE_API_KEY  when set, --api-key: every endpoint but /health and /metrics needs
#                     `Authorization: Bearer <key>` (the worker sends rollout.engine.api_key)
set -eu
: "${RLRT_MODEL:?set RLRT_MODEL to a Hugging Face model id or a model directory}"
set --
if [ -n "${RLRT_ENGINE_API_KEY:-}" ]; then
    set -- --api-key "$RLRT_ENGINE_API_KEY"
fi
# shellcheck disable=SC2086  # RLRT_ENGINE_ARGS is a list of flags
exec python3 -m sglang.launch_server \
    --model-path "$RLRT_MODEL" \
    --host "${RLRT_ENGINE_HOST:-127.0.0.1}" \
    --port "${RLRT_ENGINE_PORT:-30000}" \
    --tp-size "${RLRT_ENGINE_TP:-1}" \
    --dp-size "${RLRT_ENGINE_DP:-1}" \
    ${RLRT_ENGINE_ARGS:-} "$@"
