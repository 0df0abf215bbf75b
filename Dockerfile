# syntax=docker/dockerfile:1
# FedPatchCore: the `fedserver` and `fedclient` commands in one small, non-root image.
#
#   CPU (default):  docker build -t fedpatchcore .
#   CUDA:           docker build -t fedpatchcore:cuda \
#                     --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#
# The install stage runs scripts/docker_install.sh, the script CI runs in a clean virtual
# environment (scripts/check_docker_install.sh), so what this image installs is what CI tested.
# Server:  docker run -v fed-config:/config:ro -v fed-state:/var/lib/fedpatchcore \
#            -p 50051:50051 fedpatchcore            (FEDSERVER_CONFIG=/config/server.toml)
# Site:    docker run -v /data/plant1:/data:ro fedpatchcore fedclient run --config /config/site.toml
# compose.yaml runs a server and three sites.

ARG BASE=python:3.11-slim

# --- install: build the virtual environment ------------------------------------------------
FROM ${BASE} AS install
# torch wheels: the CPU-only index keeps the image small (no CUDA libraries); a CUDA build
# passes the matching CUDA index.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Optional extras of pyproject.toml, e.g. EXTRAS=gpu.
ARG EXTRAS=
# CUDA base images carry no Python; python images skip this.
RUN if ! command -v python3 > /dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY core ./core
COPY fedserver ./fedserver
COPY fedclient ./fedclient
COPY protos ./protos
COPY benchmarks ./benchmarks
COPY scripts/docker_install.sh ./scripts/docker_install.sh
RUN --mount=type=cache,target=/root/.cache/pip \
    PIP_EXTRA_INDEX_URL="${TORCH_INDEX}" bash scripts/docker_install.sh /opt/venv "${EXTRAS}"

# --- runtime: the environment and an unprivileged user, nothing else ------------------------
FROM ${BASE} AS runtime
RUN if ! command -v python3 > /dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --create-home --uid 10001 fedpatchcore \
    && mkdir -p /var/lib/fedpatchcore /config /data \
    && chown fedpatchcore /var/lib/fedpatchcore
COPY --from=install /opt/venv /opt/venv
# Settings through the environment (flag > environment > TOML > default): the server listens
# on every interface of the container, keeps its journal on the volume, reads /config.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FEDSERVER_CONFIG=/config/server.toml \
    FEDSERVER_BIND=0.0.0.0:50051 \
    FEDSERVER_STATE_DIR=/var/lib/fedpatchcore/state \
    FEDSERVER_METRICS_HOST=0.0.0.0
USER fedpatchcore
WORKDIR /home/fedpatchcore
# The journal and the bank versions: keep them across container restarts.
VOLUME ["/var/lib/fedpatchcore"]
# gRPC, and Prometheus metrics when FEDSERVER_METRICS_PORT=9100 is set.
EXPOSE 50051 9100
# gRPC health (grpc.health.v1): NOT_SERVING while the journal replays and while draining.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["fedserver", "health", "--timeout", "5"]
STOPSIGNAL SIGTERM
CMD ["fedserver", "serve"]
