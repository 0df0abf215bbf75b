#!/usr/bin/env bash
# CI check of the Docker image's install steps without a Docker engine (run by .ci/run):
# install with scripts/docker_install.sh into a clean virtual environment, then, from outside
# the source tree (so only the installed package is importable), run the image's entry points:
# `fedserver --help`, `fedclient --help`, `fedserver init-config`, start `fedserver serve` and
# ask it `fedserver health` (the image's HEALTHCHECK) until SERVING, then stop it with SIGTERM
# and expect a clean drain (exit 0).
#
#   scripts/check_docker_install.sh [VENV]    (default: a temporary directory, removed after)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
server_pid=""
cleanup() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" || true
        wait "$server_pid" || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
venv="${1:-$work/venv}"

start=$(date +%s)
bash "$root/scripts/docker_install.sh" "$venv"
echo "check_docker_install: install took $(( $(date +%s) - start )) s"

cd "$work"
export PATH="$venv/bin:$PATH"
unset PYTHONPATH
fedserver --help > /dev/null
fedclient --help > /dev/null
fedserver serve --help | grep -q -- "--metrics-port"
fedserver init-config --sites plant-1,plant-2,plant-3 --dir fed --global-bank-size 100 > /dev/null
FEDSERVER_BIND=127.0.0.1:0 FEDSERVER_DEVICE=cpu fedserver serve --config fed/server.toml \
    2> server.log &
server_pid=$!
port=""
for _ in $(seq 1 240); do
    port="$(sed -n 's/.*fedserver bound to port \([0-9][0-9]*\).*/\1/p' server.log | head -n 1)"
    if [ -n "$port" ] || ! kill -0 "$server_pid" 2>/dev/null; then
        break
    fi
    sleep 0.5
done
if [ -z "$port" ]; then
    echo "check_docker_install: fedserver did not start:" >&2
    cat server.log >&2
    exit 1
fi
fedserver health --address "127.0.0.1:$port" --wait 120
kill -TERM "$server_pid"
wait "$server_pid"
server_pid=""
grep -q "fedserver stopped" server.log
echo "check_docker_install: ok (fedserver and fedclient installed, health SERVING, clean drain)"
