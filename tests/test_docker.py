"""Dockerfile, compose.yaml and the install script, checked statically (no Docker engine
here; scripts/check_docker_install.sh runs the install itself in CI, from .ci/run).

Every path the files reference must exist (or be written by init-config), every command and
flag must parse with the real CLIs, every FEDSERVER_* / FEDCLIENT_* variable must name a
setting."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path, PurePosixPath

import pytest
import yaml

from fedclient import cli as client_cli
from fedclient.config import SiteSettings
from fedserver import cli as server_cli
from fedserver.config import ServerConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
SERVER_SETTINGS = {f.name for f in dataclasses.fields(ServerConfig)} - {"extra"}
SITE_SETTINGS = {f.name for f in dataclasses.fields(SiteSettings)}


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines if line and not line.startswith("#")
    ]


def install_sources() -> list[str]:
    match = re.search(r"^SOURCES=\((.*?)\)$", (ROOT / "scripts/docker_install.sh").read_text(),
                      flags=re.MULTILINE)
    assert match, "scripts/docker_install.sh lost its SOURCES list"
    return match.group(1).split()


def env_settings(pairs: dict[str, str]) -> None:
    """Every FEDSERVER_* / FEDCLIENT_* variable names a setting."""
    for name in pairs:
        prefix, _, key = name.partition("_")
        if name in ("FEDSERVER_CONFIG", "FEDCLIENT_CONFIG"):
            continue
        settings = {"FEDSERVER": SERVER_SETTINGS, "FEDCLIENT": SITE_SETTINGS}[prefix]
        assert key.lower() in settings, f"{name} names no setting"


def test_dockerfile_is_multi_stage_non_root_with_a_cuda_switch() -> None:
    instructions = dockerfile()
    stages = [args for kind, args in instructions if kind == "FROM"]
    assert stages == ["${BASE} AS install", "${BASE} AS runtime"]
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in instructions if k == "ARG"
            and "=" in a}
    assert args["BASE"].startswith("python:3.11-slim")  # CPU by default
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    starts = [i for i, (k, _) in enumerate(instructions) if k == "FROM"]
    runtime = instructions[starts[1]:]
    users = [a for k, a in runtime if k == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any(k == "COPY" and a.startswith("--from=install /opt/venv") for k, a in runtime)
    # The runtime stage installs nothing of the project: only the install stage runs pip.
    assert not any(k == "RUN" and "pip " in a for k, a in runtime)


def test_dockerfile_copies_what_the_install_script_needs_and_runs_it() -> None:
    instructions = dockerfile()
    copied: set[str] = set()
    for kind, args in instructions:
        if kind == "COPY" and not args.startswith("--from"):
            *sources, _ = shlex.split(args)
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such path"
                copied.add(source.rstrip("/"))
    assert set(install_sources()) <= copied
    assert "scripts/docker_install.sh" in copied
    runs = [a for k, a in instructions if k == "RUN" and "docker_install.sh" in a]
    assert len(runs) == 1 and "/opt/venv" in runs[0] and "${TORCH_INDEX}" in runs[0]


def test_dockerfile_entry_points_health_and_state_volume() -> None:
    instructions = dockerfile()
    env: dict[str, str] = {}
    for kind, args in instructions:
        if kind == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(args)))
    env_settings({k: v for k, v in env.items() if k.startswith(("FEDSERVER_", "FEDCLIENT_"))})
    volumes = [a for k, a in instructions if k == "VOLUME"]
    assert volumes == ['["/var/lib/fedpatchcore"]']
    state = PurePosixPath(env["FEDSERVER_STATE_DIR"])
    assert PurePosixPath("/var/lib/fedpatchcore") in state.parents  # the journal is on it
    health = next(a for k, a in instructions if k == "HEALTHCHECK")
    command = json.loads(health.split("CMD", 1)[1])  # exec form
    assert command[:2] == ["fedserver", "health"]
    server_cli.build_parser().parse_args(command[1:])  # parses (SystemExit otherwise)
    cmd = json.loads(next(a for k, a in instructions if k == "CMD"))
    assert cmd == ["fedserver", "serve"]
    assert "50051" in next(a for k, a in instructions if k == "EXPOSE")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_runs_a_server_and_three_sites(compose: dict, tmp_path: Path) -> None:
    services = compose["services"]
    sites = sorted(s for s in services if s != "fedserver")
    assert sites == ["plant-1", "plant-2", "plant-3"]
    # The files compose mounts are the ones init-config writes, relative to the compose file.
    fed = tmp_path / "fed"
    assert server_cli.main(["init-config", "--sites", ",".join(sites), "--dir", str(fed),
                            "--bind", "0.0.0.0:50051"]) == 0

    def host_path(path: str) -> Path:
        assert path.startswith("./"), path
        return tmp_path / path[2:]

    server = services["fedserver"]
    assert server["command"][0] == "fedserver"
    server_cli.build_parser().parse_args(server["command"][1:])
    env_settings(server["environment"])
    mounts = {}
    for volume in server["volumes"]:
        source, target, *_ = volume.split(":")
        if source.startswith("./"):
            assert host_path(source).is_file(), source
            mounts[target] = host_path(source)
        else:
            assert source in compose["volumes"], source
    # The mounted server.toml loads with the container's environment (tokens beside it).
    config_path = Path(mounts[server["environment"]["FEDSERVER_CONFIG"]])
    environ = {k: str(v) for k, v in server["environment"].items()
               if k not in ("FEDSERVER_CONFIG", "FEDSERVER_STATE_DIR")}
    config = load_config(config_path, None, environ)
    assert (config.bind, config.metrics_port, config.log_format) == ("0.0.0.0:50051", 9100, "json")
    assert config.tokens_file.name == "tokens" and "/config/tokens" in mounts

    for site in sites:
        service = services[site]
        command = service["command"]
        assert command[0] == "fedclient"
        args = client_cli.build_parser().parse_args(command[1:])
        assert args.command == "run"
        env = service["environment"]
        env_settings(env)
        assert env["FEDCLIENT_SITE_ID"] == site
        assert env["FEDCLIENT_SERVER"].split(":")[0] == "fedserver"
        (secret,) = service["secrets"]
        assert env["FEDCLIENT_TOKEN_FILE"] == f"/run/secrets/{secret}"
        assert host_path(compose["secrets"][secret]["file"]) == (
            fed / "site-tokens" / f"{site}.token"
        )
        data = [v for v in service["volumes"] if v.split(":")[1] == args.data.as_posix()]
        assert data == [f"./data/{site}:/data:ro"]
        out = [v.split(":") for v in service["volumes"] if not v.startswith("./")]
        assert out[0][0] in compose["volumes"]
        assert PurePosixPath(out[0][1]) in PurePosixPath(args.out.as_posix()).parents
        assert service["depends_on"]["fedserver"]["condition"] == "service_healthy"
