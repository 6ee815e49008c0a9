# rlrt verifier: the REST API + the RolloutGroup -> VerifiedGroup worker. Slim: no torch.
#   docker build -f deploy/docker/verifier.Dockerfile -t rlrt-verifier:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/rlrt/bin:$PATH

RUN groupadd --gid 10001 rlrt \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin rlrt

COPY deploy/docker/constraints.txt deploy/docker/requirements-verifier.txt /tmp/rlrt/
RUN python -m venv /opt/rlrt \
    && /opt/rlrt/bin/pip install -c /tmp/rlrt/constraints.txt -r /tmp/rlrt/requirements-verifier.txt

WORKDIR /src
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY tasks ./tasks
COPY services ./services
COPY trainer ./trainer
COPY rlrt ./rlrt
RUN /opt/rlrt/bin/pip install --no-deps . \
    && rm -rf /src /tmp/rlrt
COPY --chmod=755 deploy/docker/healthcheck.py /usr/local/bin/rlrt-healthcheck

USER 10001:10001
WORKDIR /home/rlrt
EXPOSE 8300
ENV RLRT_HEALTH_URLS=http://127.0.0.1:8300/healthz
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["rlrt-healthcheck"]
# The config is mounted at /etc/rlrt/run.yaml; the token comes from RLRT_VERIFIER__TOKEN.
ENTRYPOINT ["rlrt"]
CMD ["serve", "verifier", "--config", "/etc/rlrt/run.yaml", "--host", "0.0.0.0", "--port", "8300"]
