#!/usr/bin/env bash
# Install FedPatchCore (not editable) into a fresh virtual environment.
#
# The Docker image's install stage runs exactly this script, and CI runs it too
# (scripts/check_docker_install.sh, from .ci/run) in a clean virtual environment, because no
# Docker engine runs in CI: what the image installs is what CI tested.
#
#   scripts/docker_install.sh VENV [EXTRAS]     e.g. scripts/docker_install.sh /opt/venv gpu
#
# It installs from a copy of the files the image needs (the SOURCES below, which the Dockerfile
# COPYs), so a file missing from that list breaks CI the way it would break the image, and the
# build leaves nothing behind in the source tree. Packages come from the configured registries
# under constraints.txt (the pinned torch/torchvision pair); set PIP_EXTRA_INDEX_URL (the
# Dockerfile's TORCH_INDEX) for CPU-only or CUDA torch wheels, and pip's cache is reused.
set -euo pipefail

SOURCES=(pyproject.toml constraints.txt README.md core fedserver fedclient protos benchmarks)

root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:?usage: docker_install.sh VENV [EXTRAS]}"
extras="${2:-}"
python="${PYTHON:-python3}"

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
for path in "${SOURCES[@]}"; do
    if [ ! -e "$root/$path" ]; then
        echo "docker_install.sh: $root/$path is missing" >&2
        exit 1
    fi
    cp -R "$root/$path" "$stage/"
done
find "$stage" -name __pycache__ -type d -prune -exec rm -rf {} +

"$python" -m venv "$venv"
target="$stage"
if [ -n "$extras" ]; then
    target="$stage[$extras]"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -c "$stage/constraints.txt" "$target"
"$venv/bin/python" -m pip check
echo "docker_install.sh: installed fedpatchcore${extras:+[$extras]} into $venv"
