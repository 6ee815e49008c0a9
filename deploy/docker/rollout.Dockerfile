# rlrt rollout: the rlrt rollout worker beside an SGLang server, on the official SGLang image.
# One container runs both (rlrt-with-engine): the server on 127.0.0.1:30000, the worker's
# API on 0.0.0.0:8310. Our worker lives in its own venv, so SGLang's packages stay as shipped.
#   docker build -f deploy/docker/rollout.Dockerfile -t rlrt-rollout:0.1.0 .
# Upgrading SGLang: change SGLANG_IMAGE (docs/deploy.md, "Upgrading SGLang and vLLM").
ARG SGLANG_IMAGE=lmsysorg/sglang:v0.5.23
# torch's source, two build arguments: TORCH_INDEX_URL, an extra index holding the build (CPU or
# CUDA), and TORCH_WHEELS, an image whose root holds torch wheels (scripts/docker-bases.sh makes
# one from pip's find-links folder on machines that cannot reach the index); `scratch`: none.
ARG TORCH_WHEELS=scratch
FROM ${TORCH_WHEELS} AS torch-wheels
FROM ${SGLANG_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# torch comes from this extra index: its local version (2.13.0+cpu, +cu128) ranks above PyPI's
# plain 2.13.0, so pip takes that build; everything else comes from PyPI, pinned by constraints.txt.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# /shared: a fresh named volume mounted there takes this owner, so user 10001 can write it.
RUN groupadd --gid 10001 rlrt \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin rlrt \
    && mkdir -p /shared && chown 10001:10001 /shared

# The worker's venv: made without pip (the image's python may lack ensurepip), filled by the
# image's pip through --python. Its torch is the CPU build: the worker never touches a GPU.
COPY deploy/docker/constraints.txt deploy/docker/requirements-worker.txt /tmp/rlrt/
RUN --mount=type=bind,from=torch-wheels,target=/tmp/torch-wheels \
    python3 -m venv --without-pip /opt/rlrt \
    && python3 -m pip --python /opt/rlrt/bin/python install \
        -c /tmp/rlrt/constraints.txt --find-links /tmp/torch-wheels "torch==${TORCH_VERSION}" \
        --extra-index-url "${TORCH_INDEX_URL}" \
    && python3 -m pip --python /opt/rlrt/bin/python install \
        -c /tmp/rlrt/constraints.txt -r /tmp/rlrt/requirements-worker.txt

WORKDIR /src
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY tasks ./tasks
COPY services ./services
COPY trainer ./trainer
COPY rlrt ./rlrt
RUN python3 -m pip --python /opt/rlrt/bin/python install --no-deps . \
    && ln -s /opt/rlrt/bin/rlrt /usr/local/bin/rlrt \
    && rm -rf /src /tmp/rlrt
COPY --chmod=755 deploy/docker/with_engine.py /usr/local/bin/rlrt-with-engine
COPY --chmod=755 deploy/docker/healthcheck.py /usr/local/bin/rlrt-healthcheck
COPY --chmod=755 deploy/docker/sglang-server.sh /usr/local/bin/rlrt-sglang-server

USER 10001:10001
WORKDIR /home/rlrt
# SGLang's /health runs a one-token generation, which a weight update's pause holds: the
# health check would fail during every long update. With generation off, /health answers
# 200 once the server is up (503 while starting or exiting); /health_generate stays deep.
ENV HOME=/home/rlrt \
    SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=false \
    RLRT_ENGINE_PORT=30000 \
    RLRT_ENGINE_CMD=rlrt-sglang-server \
    RLRT_ENGINE_HEALTH=http://127.0.0.1:30000/health \
    RLRT_HEALTH_URLS="http://127.0.0.1:8310/healthz http://127.0.0.1:30000/health"
EXPOSE 8310
# Model loading takes minutes: a long start period.
HEALTHCHECK --interval=30s --timeout=10s --start-period=900s --retries=3 CMD ["rlrt-healthcheck"]
ENTRYPOINT ["rlrt-with-engine", "--"]
CMD ["rlrt", "serve", "rollout", "--config", "/etc/rlrt/run.yaml", "--host", "0.0.0.0", "--port", "8310"]
