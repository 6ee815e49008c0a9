#!/usr/bin/env bash
# Create .venv with rlrt and everything it needs, from nothing. Safe to run again (fast then).
#
# Order matters: torch first (on this kind of machine `torch==2.13.0` is the CPU build already
# on disk; elsewhere pip fetches it), then DeepSpeed with --no-build-isolation so its build
# sees that torch instead of pulling a CUDA one, then the project with its dev extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${RLRT_TORCH_SPEC:-torch==2.13.0}
DEEPSPEED_SPEC=${RLRT_DEEPSPEED_SPEC:-deepspeed==0.19.8}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
V=.venv/bin
stamp=.venv/.rlrt-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
$V/pip install -q --upgrade pip "setuptools>=68" wheel
$V/pip install -q "$TORCH_SPEC"
$V/pip install -q py-cpuinfo ninja packaging psutil pydantic hjson msgpack numpy
$V/pip install -q --no-build-isolation "$DEEPSPEED_SPEC"
$V/pip install -q -e ".[dev]"
echo "$want" > "$stamp"
echo "rlrt installed in .venv ($($V/python -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)'))"
