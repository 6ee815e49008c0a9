# Stand-in for python:3.11.14-slim-bookworm (scripts/docker-bases.sh), for machines that cannot
# pull from Docker Hub: Debian bookworm's own Python 3.11 on a debootstrap root file system.
# What the images of deploy/docker/ use from the real base: `python`/`python3` with venv and
# pip, bash, apt, Debian bookworm's package versions (cpu.Dockerfile pins g++ by them).
ARG DEBIAN_IMAGE=rlrt-stand-in/debian:bookworm
FROM ${DEBIAN_IMAGE}
# Debian's pip 23 reads no system CA store on its own; the bundle holds the machine's CA files
# (docker-bases.sh added them), so pip in every image built on this one trusts the same hosts.
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    LANG=C.UTF-8
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s /usr/bin/python3 /usr/local/bin/python \
    && rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED
CMD ["python3"]
