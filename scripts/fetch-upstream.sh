#!/usr/bin/env bash
# Fetch the released SGLang and vLLM packages that the contract tests read
# (tests/test_upstream_contract*.py, tests/test_nccl_rendezvous.py): the pinned wheels, no
# dependencies, from the package registry; only their Python sources are kept, unpacked under
# .upstream/<name>/ (git-ignored) with the version in .upstream/<name>/VERSION.
# The pins are the images' (one fact, one place):
#   SGLang = deploy/docker/rollout.Dockerfile  ARG SGLANG_IMAGE=lmsysorg/sglang:v<version>
#   vLLM   = deploy/docker/trainer.Dockerfile  ARG VLLM_VERSION=<version>  (= teacher image tag)
# Usage: bash scripts/fetch-upstream.sh        (CI runs it after scripts/setup.sh)
# Knobs: RLRT_UPSTREAM_DIR (default .upstream), PYTHON (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${RLRT_UPSTREAM_DIR:-.upstream}
PY=${PYTHON:-.venv/bin/python}

sglang_version=$(sed -n 's/^ARG SGLANG_IMAGE=.*:v\([0-9][0-9.]*\)$/\1/p' deploy/docker/rollout.Dockerfile)
vllm_version=$(sed -n 's/^ARG VLLM_VERSION=\([0-9][0-9.]*\)$/\1/p' deploy/docker/trainer.Dockerfile)
: "${sglang_version:?no SGLANG_IMAGE pin in deploy/docker/rollout.Dockerfile}"
: "${vllm_version:?no VLLM_VERSION pin in deploy/docker/trainer.Dockerfile}"

fetch() {  # name version
    local name=$1 version=$2 dir=$DEST/$1 tmp
    if [ "$(cat "$dir/VERSION" 2>/dev/null)" = "$version" ]; then
        echo "$name $version: already in $dir"
        return
    fi
    tmp=$(mktemp -d)
    # --no-deps: the sources are read, never imported as a whole (most of them need CUDA)
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "$name==$version"
    rm -rf "$dir"
    "$PY" - "$tmp" "$dir" "$name" <<'EOF'
import sys, zipfile
from pathlib import Path

tmp, dest, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
(wheel,) = tmp.glob("*.whl")
with zipfile.ZipFile(wheel) as z:
    for member in z.namelist():
        if member.startswith(f"{name}/") and member.endswith(".py"):
            z.extract(member, dest)
EOF
    echo "$version" >"$dir/VERSION"
    rm -rf "$tmp"
    echo "$name $version: unpacked into $dir"
}

fetch sglang "$sglang_version"
fetch vllm "$vllm_version"
