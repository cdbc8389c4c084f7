# syntax=docker/dockerfile:1
# relay: one pod per container. Build: docker build -t relay:0.1.0 .
# Two stages: `build` installs relay and its dependencies into a virtualenv, the runtime stage copies
# only that virtualenv onto the same slim base (no compiler, no pip cache, no sources).
ARG PYTHON_VERSION=3.12.12
# The base of both stages. Any image with python3 (3.11+) and its venv module will do: the tests build
# on a Debian bookworm root made with mmdebstrap (no registry there). The label below names it.
ARG BASE_IMAGE=docker.io/library/python:${PYTHON_VERSION}-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml ./
COPY service ./service
# Every dependency ships manylinux wheels (uvloop, httptools, orjson, hiredis): no compiler needed.
RUN python -m venv /opt/relay \
    && /opt/relay/bin/pip install --no-compile /src \
    && /opt/relay/bin/python -m compileall -q -j 0 /opt/relay/lib

FROM ${BASE_IMAGE}
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="relay" \
      org.opencontainers.image.description="WebSocket group relay: stateless Starlette + uvicorn pods that meet in Redis" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
COPY --from=build /opt/relay /opt/relay
# Bytecode was compiled at build time, so nothing writes to the (read-only) root filesystem; /tmp is
# the only writable path (an emptyDir in the Helm chart).
ENV PATH=/opt/relay/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    RELAY_HOST=0.0.0.0 \
    RELAY_INTERNAL_HOST=0.0.0.0 \
    RELAY_LOG_FORMAT=json
WORKDIR /tmp
# A numeric user that exists in no passwd file: Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
# 8000: WebSockets (public). 8001: /metrics, /healthz, /readyz, /drain (internal).
EXPOSE 8000 8001
# slim has no curl: Python asks the internal port. Liveness only: /healthz never depends on Redis.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('RELAY_INTERNAL_PORT', '8001') + '/healthz', timeout=2)"]
ENTRYPOINT ["python", "-m", "service"]
