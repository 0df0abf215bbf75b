"""Every command of the ```bash blocks of README.md and of the pages in docs/ is exercised here
or by CI.

The python blocks run in tests/test_readme.py. For the shell commands, run in a fresh folder per
block (one that already holds `fed/`, the configuration the README's first step writes, unless
the block writes it itself, and each site's token file as the server's operator hands it over,
``plant-1.token``):

* ``fedserver init-config`` and ``fedclient init-config`` run for real;
* ``fedserver serve`` resolves its whole configuration (file + environment + flags) exactly as
  the daemon would, so every flag, file and variable must exist and validate; starting a
  daemon is tested in tests/test_fedserver_process.py and tests/test_observability.py;
* other ``fedserver`` / ``fedclient`` commands parse with the real parsers and resolve their
  settings (``fedclient`` file + environment + flags; a command that talks to a server also
  resolves its connection, so its token file must exist);
* ``docker build`` / ``docker compose``: every build argument is an ARG of the Dockerfile and
  compose.yaml exists (tests/test_docker.py checks both files; CI runs the image's install
  script, scripts/check_docker_install.sh);
* the Flower block (``pip install "fedpatchcore[flower]"``, ``flower-superlink``,
  ``flower-supernode``, ``flwr run``) runs for real in tests/test_flower.py, which reads it from
  docs/flower.md;
* ``fedbench`` commands (``sudo`` allowed: the links benchmark needs root) parse with the real
  entry point and the sub-command's own parser (the benchmarks' quick runs are tested in
  tests/test_bench_*.py and tests/test_benchmarks_cli.py);
* ``python3 dev.py test`` is what .ci/run runs; ``python3 dev.py demo`` is the demo that
  tests/test_system_e2e.py drives through fedclient.demo.

A command matching none of these fails the test: add a check for it here.
"""

from __future__ import annotations

import importlib
import re
import shlex
import shutil
from pathlib import Path

import pytest

from benchmarks import __main__ as bench_cli
from fedclient import cli as client_cli
from fedserver import cli as server_cli
from fedserver.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
_FLOWER_PROGRAMS = ("flower-superlink", "flower-supernode", "flwr")
_ASSIGNMENT = re.compile(r"^([A-Z][A-Z0-9_]*)=(.*)$")


def bash_blocks(text: str) -> list[list[str]]:
    """The command lines of each ```bash block: continuations joined, comments dropped."""
    blocks = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines = []
        for line in joined.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                lines.append(line)
        blocks.append(lines)
    return blocks


def _serve(argv: list[str], env: dict[str, str]) -> None:
    args = server_cli.build_parser().parse_args(argv)
    overrides = {key: getattr(args, key) for key in server_cli._SERVE_KEYS}
    load_config(args.config, overrides, env)  # ConfigError if anything does not resolve


def _hand_over_tokens(fed: Path, cwd: Path) -> None:
    """What the server's operator does: give each site its token file (here: beside it)."""
    for token in sorted((fed / "site-tokens").glob("*.token")):
        shutil.copy(token, cwd / token.name)


def _fedserver(argv: list[str], env: dict[str, str], cwd: Path) -> None:
    if argv[0] == "serve":
        _serve(argv, env)
    elif argv[0] == "init-config":
        assert server_cli.main(argv) == 0, argv
        args = server_cli.build_parser().parse_args(argv)
        _hand_over_tokens(cwd / args.dir, cwd)
    elif argv[0] in ("site", "round"):
        # an operator command resolves the server's address and the operator's token (the
        # operator.token init-config wrote next to server.toml), as it would to call the server
        from fedserver.operator_cli import _address, _token

        args = server_cli.build_parser().parse_args(argv)
        assert _address(args) and _token(args), argv
    else:
        server_cli.build_parser().parse_args(argv)


def _fedclient(argv: list[str], env: dict[str, str]) -> None:
    if argv[0] == "init-config":
        assert client_cli.main(argv) == 0, argv
        return
    args = client_cli.build_parser().parse_args(argv)
    values = client_cli._settings(args, environ=env)
    if argv[0] in ("run", "status") or (argv[0] == "check" and values.get("server")):
        client_cli._connection(values)  # the token file must exist, the address parse


def _docker(argv: list[str]) -> None:
    if argv[0] == "compose":
        assert argv[1:] in (["up"], ["up", "-d"], ["down"]), argv
        assert (ROOT / "compose.yaml").is_file()
        return
    assert argv[0] == "build" and argv[-1] == ".", argv
    dockerfile = (ROOT / "Dockerfile").read_text()
    declared = set(re.findall(r"^ARG ([A-Z_]+)", dockerfile, flags=re.MULTILINE))
    words = iter(argv[1:-1])
    for word in words:
        if word == "--build-arg":
            name = next(words).split("=", 1)[0]
            assert name in declared, f"docker build --build-arg {name}: no such ARG"
        else:
            assert word == "-t", word
            next(words)


def _fedbench(argv: list[str]) -> None:
    args = bench_cli.build_parser().parse_args(argv)
    module = importlib.import_module(f"benchmarks.{bench_cli.COMMANDS[args.command][0]}")
    assert hasattr(module, "build_parser"), f"fedbench {args.command}: give it a build_parser()"
    module.build_parser().parse_args(args.args)


def run_command(line: str, cwd: Path) -> None:
    words = shlex.split(line, comments=True)
    env: dict[str, str] = {}
    while _ASSIGNMENT.match(words[0]):
        name, value = _ASSIGNMENT.match(words[0]).groups()  # type: ignore[union-attr]
        env[name] = value
        words = words[1:]
    if words[0] == "sudo":
        words = words[1:]
    program, argv = words[0], words[1:]
    if program in ("python", "python3") and argv[:2] == ["-m", "fedserver"]:
        program, argv = "fedserver", argv[2:]
    if program == "fedserver":
        _fedserver(argv, env, cwd)
    elif program == "fedclient":
        _fedclient(argv, env)
    elif program == "docker":
        _docker(argv)
    elif program == "fedbench":
        _fedbench(argv)
    elif program in _FLOWER_PROGRAMS or words == ["pip", "install", "fedpatchcore[flower]"]:
        flower_test = (ROOT / "tests/test_flower.py").read_text()
        assert "def test_readme_flower_commands" in flower_test, line
        assert program in flower_test, f"tests/test_flower.py does not run {program!r}"
    elif program == "python3" and argv[:1] == ["dev.py"]:
        assert argv[1:] in (["test"], ["demo"], ["demo", "--in-process"]), argv
        if argv[1] == "test":
            assert "python3 dev.py test" in (ROOT / ".ci/run").read_text()
    else:
        raise AssertionError(
            f"command {line!r} is exercised by no test: add a check for it in "
            "tests/test_readme_commands.py"
        )


def test_every_shell_command_of_readme_and_docs_is_exercised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands = 0
    for page in PAGES:
        blocks = bash_blocks(page.read_text(encoding="utf-8"))
        if page == README:
            assert len(blocks) >= 2, "README lost its shell examples"
        for number, lines in enumerate(blocks):
            cwd = tmp_path / f"{page.stem}-{number}"
            cwd.mkdir()
            monkeypatch.chdir(cwd)
            if not any(re.search(r"fedserver init-config", line) for line in lines):
                assert server_cli.main(["init-config", "--sites", "plant-1,plant-2,plant-3",
                                        "--dir", "fed"]) == 0
                _hand_over_tokens(cwd / "fed", cwd)
            for line in lines:
                try:
                    run_command(line, cwd)
                except SystemExit as error:  # argparse refused the command line
                    raise AssertionError(f"{page.name}: command {line!r} does not parse") from error
                except Exception as error:
                    raise AssertionError(f"{page.name}: command {line!r}: {error}") from error
                commands += 1
    assert commands >= 25
