# Stand-in for redis:7.4.6-alpine (scripts/docker-bases.sh): Debian bookworm's redis-server
# (7.0) and redis-cli, which is all docker-compose.yml's redis service runs (sh, redis-server,
# redis-cli for its health check). Runs as Debian's `redis` user, not root.
ARG DEBIAN_IMAGE=rlrt-stand-in/debian:bookworm
FROM ${DEBIAN_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o redis -g redis /data
# hadolint ignore=DL3066
USER redis
WORKDIR /data
CMD ["redis-server"]
