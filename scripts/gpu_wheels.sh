#!/usr/bin/env bash
# Build .whl/, what scripts/gpu_check.sh needs beside the repository on a bare GPU machine (no
# network; torch, transformers, numpy, safetensors, httpx, yaml, rich there already -- the
# lent machine's image, tests/gpu/README.md): the wheels of the Python packages it lacks, at
# the versions this repository's .venv runs (DeepSpeed built with its ops off: pure Python,
# ops JIT-built if ever used), requirements.txt naming them, and SGLang's update-group code
# copied from the released sources (tests/gpu/selfcheck/extract_sglang.py; never committed).
# .whl/ is git-ignored; it travels as an ignored path (the device tool: carry [".whl"]).
# Usage: bash scripts/gpu_wheels.sh        (after scripts/setup.sh and scripts/fetch-upstream.sh)
# Knobs: RLRT_GPU_WHEELS (default .whl), RLRT_GPU_PYVER (the GPU machine's Python, default
#        3.12), RLRT_GPU_WHEELS_EXTRA (more "name==version" to carry), PYTHON (.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${RLRT_GPU_WHEELS:-.whl}
PYVER=${RLRT_GPU_PYVER:-3.12}
PY=${PYTHON:-.venv/bin/python}
# What the check imports that the GPU image lacks (one place: this list).
NEEDS="pydantic pydantic-core annotated-types typing-inspection pydantic-settings python-dotenv
       tenacity hjson"
pin() { "$PY" -c "import importlib.metadata as m; print('$1==' + m.version('$1'))"; }
rm -rf "$DEST" && mkdir -p "$DEST"
pins=()
for n in $NEEDS; do pins+=("$(pin "$n")"); done
# shellcheck disable=SC2206  # word splitting of the extra pins is wanted
pins+=(${RLRT_GPU_WHEELS_EXTRA:-})
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEST" "${pins[@]}"
# DeepSpeed ships an sdist only: build its wheel here, ops off, against this venv's torch
ds=$(pin deepspeed)
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DEST" "$ds"
printf '%s\n' "${pins[@]}" "$ds" >"$DEST/requirements.txt"
PYTHONPATH=tests/gpu "$PY" -m selfcheck.extract_sglang "${RLRT_UPSTREAM_DIR:-.upstream}" \
    "$DEST/sglang_update_group.py"
du -sh "$DEST"
ls -l "$DEST"
