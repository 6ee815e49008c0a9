#!/usr/bin/env bash
# Fetch the released SGLang and vLLM packages that the contract tests read
# (tests/test_upstream_contract*.py, tests/test_nccl_rendezvous.py): the pinned wheels, no
# dependencies, from the package registry; only their Python sources are kept, unpacked under
# .upstream/<name>/ (git-ignored) with the version in .upstream/<name>/VERSION.
# The pins are the images' (one fact, one place):
#   SGLang = deploy/docker/rollout.Dockerfile  ARG SGLANG_IMAGE=lmsysorg/sglang:v<version>
#   vLLM   = deploy/docker/trainer.Dockerfile  ARG VLLM_VERSION=<version>  (= teacher image tag)
# Also Math-Verify's own test suite (tests/test_verifier_conformance.py), which ships only in
# its source distribution: the sdist of the version installed in the venv (the one the verifier
# runs), its tests/*.py kept under .upstream/math_verify/tests/, version in .../VERSION.
# And the METADATA (only that: PEP 658 files or range reads, never a whole wheel) of the wheels
# that decide each image's NCCL version, under .upstream/wheel-metadata/ for
# tests/test_nccl_parity.py (scripts/fetch_wheel_metadata.py says which and how; an index it
# cannot reach is recorded there and the test skips that image with the reason).
# Usage: bash scripts/fetch-upstream.sh [sglang|vllm|math_verify|nccl ...]   (default: all;
#        CI runs it after scripts/setup.sh)
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

# Math-Verify: the sdist (its wheel has no tests) of the version the verifier really runs.
fetch_math_verify_tests() {
    local version dir=$DEST/math_verify tmp
    version=$("$PY" -c 'import importlib.metadata as m; print(m.version("math-verify"))')
    if [ "$(cat "$dir/VERSION" 2>/dev/null)" = "$version" ]; then
        echo "math-verify $version tests: already in $dir"
        return
    fi
    tmp=$(mktemp -d)
    "$PY" -m pip download --quiet --no-deps --no-binary :all: -d "$tmp" "math-verify==$version"
    rm -rf "$dir"
    "$PY" - "$tmp" "$dir" <<'EOF'
import sys, tarfile
from pathlib import Path

tmp, dest = Path(sys.argv[1]), Path(sys.argv[2])
(sdist,) = tmp.glob("*.tar.gz")
with tarfile.open(sdist) as t:
    for m in t.getmembers():
        parts = Path(m.name).parts  # math_verify-<version>/tests/<file>.py
        if m.isfile() and len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py"):
            out = dest / "tests" / parts[2]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(t.extractfile(m).read())
EOF
    echo "$version" >"$dir/VERSION"
    rm -rf "$tmp"
    echo "math-verify $version tests: unpacked into $dir/tests"
}

for what in "${@:-sglang vllm math_verify nccl}"; do
    for one in $what; do
        case $one in
            sglang) fetch sglang "$sglang_version" ;;
            vllm) fetch vllm "$vllm_version" ;;
            math_verify) fetch_math_verify_tests ;;
            nccl) "$PY" scripts/fetch_wheel_metadata.py "$DEST/wheel-metadata" ;;
            *) echo "unknown upstream $one (sglang, vllm, math_verify, nccl)" >&2; exit 2 ;;
        esac
    done
done
