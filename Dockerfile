# FedPatchCore: server and site CLIs, CPU image. Build: docker build -t fedpatchcore .
# GPU sites: start from an NVIDIA CUDA base image instead and install the `gpu` extra.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/fedpatchcore

# Dependencies first (layer cache): the pinned torch/torchvision pair, then the project.
COPY pyproject.toml constraints.txt README.md ./
COPY core ./core
COPY fedserver ./fedserver
COPY fedclient ./fedclient
COPY protos ./protos
RUN pip install -c constraints.txt .

# Unprivileged user; models and data are mounted at /data.
RUN useradd --create-home --uid 10001 fedpatchcore
USER fedpatchcore
VOLUME ["/data"]

CMD ["python", "-m", "core.demo"]
