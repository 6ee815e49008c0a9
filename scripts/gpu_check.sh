#!/usr/bin/env bash
# The GPU check for a bare one-GPU machine (tests/gpu/README.md): the repository plus .whl/
# (scripts/gpu_wheels.sh) and the machine's own torch; no network, no model files. Runs the
# trainer's ZeRO 0/2/3 update steps, the weight canary, the production NCCL push into SGLang's
# own receive code, and the bound default group (tests/gpu/selfcheck/), in under 9 minutes;
# writes JSON results ($OUT/gpu_check.json when OUT is set, else runs/gpu_check.json) and exits
# non-zero when any check failed.
# Usage: bash scripts/gpu_check.sh            on the GPU machine
#        bash scripts/gpu_check.sh --cpu      the rehearsal (gloo, fp32, no CUDA; .ci/run)
#        bash scripts/gpu_check.sh --engines  the full-node check against real SGLang and vLLM
#                                             servers (scripts/gpu_check_engines.sh)
# Knobs: PYTHON (an interpreter that already has everything: no venv is made), BASE_PYTHON
#        (the machine's interpreter the venv is made over, default python3), RLRT_GPU_WHEELS
#        (default .whl), RLRT_GPU_CHECK_JSON (the results file), RLRT_UPSTREAM_DIR (where
#        SGLang's sources are when .whl/ has no copy), GPU_CHECK_TIMEOUT_S (default 540),
#        RLRT_GPU_CHECK_KEEP=1 (keep the work directory: models, role logs).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--engines" ]; then
    shift
    exec bash scripts/gpu_check_engines.sh "$@"
fi
mode=()
if [ "${1:-}" = "--cpu" ]; then
    mode=(--cpu)
    shift
    export DS_ACCELERATOR=cpu
fi
WHL=${RLRT_GPU_WHEELS:-.whl}
RESULTS=${RLRT_GPU_CHECK_JSON:-${OUT:+$OUT/gpu_check.json}}
RESULTS=${RESULTS:-runs/gpu_check.json}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rlrt-gpu-check.XXXXXX")
# models, weights and role logs (~300 MB); a failed check's JSON quotes its role's log tail
[ "${RLRT_GPU_CHECK_KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# Every process of the check shares one GPU; NCCL's socket transport joins them on loopback.
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-lo}

if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ ${#mode[@]} -gt 0 ] && [ -z "${RLRT_GPU_WHEELS:-}" ] && [ -x .venv/bin/python ]; then
    # the rehearsal in a development checkout (scripts/setup.sh); a .whl/ built for the GPU
    # machine's Python is not for this one (RLRT_GPU_WHEELS=... rehearses the wheel install)
    PY=.venv/bin/python
elif [ -f "$WHL/requirements.txt" ]; then
    # A venv over the machine's interpreter, its packages (torch) visible: through
    # --system-site-packages, and a .pth line for when that interpreter is itself a venv (the
    # lent machine's torch lives in /opt/torch/.venv), whose packages that flag would not show.
    BASE=${BASE_PYTHON:-python3}
    "$BASE" -m venv --without-pip --system-site-packages "$WORK/venv"
    site=$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    "$BASE" -c 'import site; print(*site.getsitepackages(), site.getusersitepackages(), sep="\n")' \
        >"$site/machine-site.pth"
    # the machine's pip, into the venv (which has none); offline, no dependency resolution:
    # the wheels are exactly what the machine lacks (scripts/gpu_wheels.sh)
    "$BASE" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" \
        --find-links "$WHL" -r "$WHL/requirements.txt"
    PY=$WORK/venv/bin/python
else
    echo "no $WHL/requirements.txt: build it with scripts/gpu_wheels.sh (tests/gpu/README.md)" >&2
    exit 2
fi
imports='import deepspeed, pydantic, pydantic_settings, tenacity, transformers, safetensors, httpx'
if ! "$PY" -c "$imports"; then
    echo "the check's packages do not import with $PY (tests/gpu/README.md)" >&2
    exit 2
fi

SGLANG=$WHL/sglang_update_group.py
if [ ! -f "$SGLANG" ]; then
    SGLANG=$WORK/sglang_update_group.py
    PYTHONPATH=tests/gpu "$PY" -m selfcheck.extract_sglang "${RLRT_UPSTREAM_DIR:-.upstream}" \
        "$SGLANG"
fi
rc=0
PYTHONPATH=.:tests:tests/gpu timeout "${GPU_CHECK_TIMEOUT_S:-540}" \
    "$PY" -m selfcheck.run "${mode[@]}" --sglang "$SGLANG" --out "$RESULTS" --work "$WORK" "$@" \
    || rc=$?
if [ "$rc" != 0 ]; then  # every process's log beside the results (the work dir is removed)
    mkdir -p "$(dirname "$RESULTS")"
    logs=$(cd "$(dirname "$RESULTS")" && pwd)/gpu_check_logs.tar.gz
    (cd "$WORK" && tar -czf "$logs" ./*.log) 2>/dev/null || true
    echo "gpu check failed ($rc): $RESULTS; process logs in $logs" >&2
fi
exit "$rc"
