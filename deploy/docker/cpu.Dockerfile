# rlrt on the CPU: the whole embedded stack (`rlrt train`: Redis, verifier, rollout, teacher,
# DeepSpeed trainer) with the built-in CPU engine. Also serves each part alone, as the
# docker-compose `cpu` profile does.
#   docker build -f deploy/docker/cpu.Dockerfile -t rlrt-cpu:0.1.0 .
#   docker run --rm -v rlrt-runs:/home/rlrt/runs rlrt-cpu:0.1.0
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
# torch's source, two build arguments: TORCH_INDEX_URL, an extra index holding the build (CPU or
# CUDA), and TORCH_WHEELS, an image whose root holds torch wheels (scripts/docker-bases.sh makes
# one from pip's find-links folder on machines that cannot reach the index); `scratch`: none.
ARG TORCH_WHEELS=scratch
FROM ${TORCH_WHEELS} AS torch-wheels
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# torch comes from this extra index: its local version (2.13.0+cpu, +cu128) ranks above PyPI's
# plain 2.13.0, so pip takes that build; everything else comes from PyPI, pinned by constraints.txt.
# TOKENIZERS_PARALLELISM below is no secret (hadolint flags any name with "TOKEN" in it)
# hadolint ignore=DL3064
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/rlrt/bin:$PATH \
    DS_ACCELERATOR=cpu \
    TOKENIZERS_PARALLELISM=false

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# g++: DeepSpeed JIT-compiles its CPU ops (shm comm) on first use. Pinned to bookworm's.
# /shared: a fresh named volume mounted there (the compose cpu profile) takes this owner.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++=4:12.2.0-3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 rlrt \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin rlrt \
    && install -d -o 10001 -g 10001 /home/rlrt/runs /shared

# Install order (scripts/setup.sh): torch, then DeepSpeed without build isolation (so it builds
# against this torch instead of pulling a CUDA one), then the project.
COPY deploy/docker/constraints.txt /tmp/rlrt/
RUN --mount=type=bind,from=torch-wheels,target=/tmp/torch-wheels \
    python -m venv /opt/rlrt \
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
RUN pip install -c /tmp/rlrt/constraints.txt . \
    && rm -rf /tmp/rlrt
COPY --chmod=755 deploy/docker/healthcheck.py /usr/local/bin/rlrt-healthcheck
COPY --chown=10001:10001 configs /home/rlrt/configs

USER 10001:10001
WORKDIR /home/rlrt
ENV HOME=/home/rlrt \
    TORCH_EXTENSIONS_DIR=/home/rlrt/.cache/torch_extensions \
    RLRT_HEALTH_URLS=""
# `rlrt train` serves no HTTP of its own; a service started from this image sets
# RLRT_HEALTH_URLS (the compose file does), and the check then probes it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["/bin/sh", "-c", "[ -z \"$RLRT_HEALTH_URLS\" ] || rlrt-healthcheck"]
ENTRYPOINT ["rlrt"]
CMD ["train", "--config", "configs/countdown-tiny.yaml"]
