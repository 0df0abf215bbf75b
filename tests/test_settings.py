"""Configuration of both CLIs: commented init-config files that list every setting and load
back, and the precedence flag > environment > TOML > default."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from core.settings import SettingsError, env_overrides
from fedclient import cli as client_cli
from fedclient.config import SiteSettings
from fedserver.cli import build_parser as server_parser
from fedserver.cli import main as server_main
from fedserver.config import ConfigError, ServerConfig, load_config

SERVER_FIELDS = [f.name for f in dataclasses.fields(ServerConfig) if f.name != "extra"]
SITE_FIELDS = [f.name for f in dataclasses.fields(SiteSettings)]


def _setting_lines(text: str) -> dict[str, str]:
    """{key: the line} of every `key = ...` or `# key = ...` line."""
    return {m.group(1): m.group(0) for m in re.finditer(
        r"^(?:# )?([a-z_]+) = .*$", text, flags=re.MULTILINE)}


@pytest.fixture
def server_dir(tmp_path: Path) -> Path:
    assert server_main(["init-config", "--sites", "a,b,c", "--dir", str(tmp_path / "fed"),
                        "--global-bank-size", "40"]) == 0
    return tmp_path / "fed"


def test_server_init_config_documents_every_setting_and_loads_back(server_dir: Path) -> None:
    text = (server_dir / "server.toml").read_text()
    lines = _setting_lines(text)
    assert sorted(lines) == sorted(SERVER_FIELDS)
    for field in dataclasses.fields(ServerConfig):
        if field.name == "extra":
            continue
        block = text.split(lines[field.name])[0].rsplit("\n\n", 1)[-1]
        assert block.count("# default: ") == 1, field.name  # its help, then its default
        assert field.metadata["help"].splitlines()[0] in block, field.name
    config = load_config(server_dir / "server.toml")
    assert config.expected_sites == ("a", "b", "c") and config.global_bank_size == 40
    assert config.state_dir == server_dir / "state"  # relative to the file
    # The commented-out extractor example is itself valid: uncommented, it loads and pins D.
    pinned = text.replace("# extractor = ", "extractor = ")
    (server_dir / "pinned.toml").write_text(pinned)
    assert load_config(server_dir / "pinned.toml").feature_dim == 1024


def test_server_precedence_flag_over_environment_over_file(server_dir: Path) -> None:
    path = server_dir / "server.toml"
    path.write_text(path.read_text().replace("quorum = 0", "quorum = 1"))
    assert load_config(path).quorum == 1  # file over default
    env = {"FEDSERVER_QUORUM": "2", "FEDSERVER_BIND": "0.0.0.0:6000",
           "FEDSERVER_EXPECTED_SITES": "a, b, c", "FEDSERVER_FSYNC": "no"}
    config = load_config(path, {"quorum": None}, env)  # an unset flag does not count
    assert (config.quorum, config.bind, config.fsync) == (2, "0.0.0.0:6000", False)
    assert config.expected_sites == ("a", "b", "c")
    assert load_config(path, {"quorum": 3}, env).quorum == 3  # flag over environment
    assert load_config(None, {"state_dir": server_dir / "s", "tokens_file": server_dir /
                              "tokens"}).quorum == 0  # default
    # FEDSERVER_CONFIG names the file when --config is not given.
    assert load_config(None, None, {"FEDSERVER_CONFIG": str(path)}).quorum == 1


@pytest.mark.parametrize(("env", "message"), [
    ({"FEDSERVER_QUORUM": "two"}, "FEDSERVER_QUORUM must be an integer"),
    ({"FEDSERVER_QUORM": "2"}, "FEDSERVER_QUORM names no setting"),
    ({"FEDSERVER_FSYNC": "maybe"}, "FEDSERVER_FSYNC must be true or false"),
    ({"FEDSERVER_STRATEGY": "best"}, "FEDSERVER_STRATEGY must be one of"),
    ({"FEDSERVER_EXTRACTOR": "x"}, "FEDSERVER_EXTRACTOR: cannot be set from the environment"),
    ({"FEDSERVER_QUORUM": "7"}, "quorum must be an int in [0, 3]"),
])
def test_server_environment_errors_name_the_variable(
    server_dir: Path, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(server_dir / "server.toml", None, env)


def test_serve_refuses_a_bad_environment_variable_in_one_line(
    server_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FEDSERVER_ROUNDS", "many")
    assert server_main(["serve", "--config", str(server_dir / "server.toml")]) == 2
    assert capsys.readouterr().err.strip() == (
        "fedserver: configuration error: FEDSERVER_ROUNDS must be an integer, got 'many'"
    )


def test_help_states_the_precedence(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        server_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "flag > environment variable FEDSERVER_<SETTING>" in text
    assert "> TOML file > default" in text and "--metrics-port" in text
    with pytest.raises(SystemExit):
        client_cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "flag > environment variable FEDCLIENT_<SETTING>" in text


def test_site_init_config_documents_every_setting_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    assert client_cli.main(["init-config", str(path), "--site-id", "plant-1"]) == 0
    text = path.read_text()
    assert sorted(_setting_lines(text)) == sorted(SITE_FIELDS)
    data = tomllib.loads(text)
    assert data["site_id"] == "plant-1" and data["upload_factor"] == 2.0
    assert "coreset_percentage" not in data  # unset: the upload is sized from k
    # One file serves every command: status has no --data, yet the file's `data` is fine.
    args = client_cli.build_parser().parse_args(["status", "--config", str(path)])
    values = client_cli._settings(args, environ={})
    assert values["site_id"] == "plant-1" and values["retries"] == 6
    # named as fedserver init-config names the site's token: it works once handed over
    assert values["token_file"] == tmp_path / "plant-1.token"


def test_every_site_flag_is_a_documented_setting() -> None:
    """A flag added to fedclient without a SiteSettings field would be missing from
    init-config and unreachable from the environment."""
    parser = client_cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    per_command = {"config", "verbose", "help", "round", "follow", "json", "path"}
    dests = {a.dest for name, sub in commands.items() if name != "init-config"
             for a in sub._actions} - per_command
    assert dests == set(SITE_FIELDS)


def test_site_precedence_flag_over_environment_over_file(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    assert client_cli.main(["init-config", str(path), "--site-id", "from-file"]) == 0
    parser = client_cli.build_parser()
    env = {"FEDCLIENT_SITE_ID": "from-env", "FEDCLIENT_RETRIES": "2",
           "FEDCLIENT_CATEGORIES": "screw,washer", "FEDCLIENT_CONFIG": str(path)}
    values = client_cli._settings(parser.parse_args(["run"]), environ=env)
    assert (values["site_id"], values["retries"]) == ("from-env", 2)
    assert values["categories"] == ("screw", "washer")
    assert values["server"] == "127.0.0.1:50051"  # from the file FEDCLIENT_CONFIG names
    values = client_cli._settings(parser.parse_args(["run", "--site-id", "from-flag"]),
                                  environ=env)
    assert values["site_id"] == "from-flag"
    values = client_cli._settings(parser.parse_args(["run", "--config", str(path)]), environ={})
    assert values["site_id"] == "from-file" and values["retries"] == 6  # file, then default


def test_site_environment_errors_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FEDCLIENT_TIMEOUT", "soon")
    assert client_cli.main(["status", "--server", "127.0.0.1:1", "--site-id", "x"]) == 2
    assert capsys.readouterr().err.strip() == (
        "fedclient: error: FEDCLIENT_TIMEOUT must be a number, got 'soon'"
    )
    with pytest.raises(SettingsError, match="FEDCLIENT_SITEID names no setting"):
        env_overrides("FEDCLIENT", SiteSettings, {"FEDCLIENT_SITEID": "x"})


def test_every_serve_flag_reaches_the_configuration() -> None:
    """A flag of `fedserver serve` missing from _SERVE_KEYS would be parsed and then ignored."""
    from fedserver.cli import _SERVE_KEYS

    parser = server_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    dests = {a.dest for a in serve._actions} - {"help", "config"}
    assert dests == set(_SERVE_KEYS)
    assert set(_SERVE_KEYS) <= set(SERVER_FIELDS)
