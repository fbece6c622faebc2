# syntax=docker/dockerfile:1
# ecu-sidecar: the quota sidecar (`serve`, the default), the flusher (`flush`) and the ledger
# migrations (`migrate`) in one image. Build: `make image` or `docker build -t ecu-sidecar .`
# (docs/operations.md, "The image"). Pin the base by digest in your registry mirror for fully
# reproducible builds: PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:<digest>.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# -- build: a venv with the project and its dependencies (wheels only, no compiler) ---------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/ecu
WORKDIR /src
# Dependencies exactly as locked (versions and hashes: requirements/image.txt, `make lock`),
# then the project without resolving anything; the embedded store's packages are not in the
# image (a production sidecar names its Redis). pip and setuptools leave the venv at the end.
COPY requirements/image.txt ./requirements/image.txt
RUN /opt/ecu/bin/pip install --only-binary=:all: --require-hashes --no-deps \
      -r requirements/image.txt
COPY pyproject.toml README.md ./
COPY ecu_sidecar ./ecu_sidecar
RUN /opt/ecu/bin/pip install --no-deps . \
 && /opt/ecu/bin/python -m compileall -q /opt/ecu/lib \
 && /opt/ecu/bin/ecu-sidecar --version \
 && /opt/ecu/bin/python -m pip uninstall --yes pip setuptools

# -- runtime: the venv and an unprivileged user, nothing else -------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="ecu-sidecar" \
      org.opencontainers.image.description="ECU quota sidecar, ledger flusher and migrations" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 ecu \
 && useradd --system --uid 10001 --gid ecu --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin ecu
COPY --from=build /opt/ecu /opt/ecu
COPY ratecards/example.toml /etc/ecu/ratecards/example.toml
ENV PATH=/opt/ecu/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ECU_LISTEN=127.0.0.1:50051 \
    ECU_LOG_FORMAT=json
# Numeric user, so Kubernetes can verify runAsNonRoot without a passwd lookup.
USER 10001:10001
WORKDIR /tmp
# 50052: gRPC health (ECU_HEALTH_LISTEN), 9465: /metrics (ECU_METRICS_LISTEN, as the chart sets
# it). The quota gRPC port stays on 127.0.0.1 inside the pod.
EXPOSE 50052 9465
# The sidecar's gRPC health (ECU_HEALTH_LISTEN, else ECU_LISTEN); a flusher container runs
# `ecu-sidecar health --flusher` (its /livez) instead. Kubernetes uses the chart's probes.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["ecu-sidecar", "health"]
ENTRYPOINT ["ecu-sidecar"]
CMD ["serve"]
