"""Benchmark scripts stay importable and their CLIs answer --help (they run outside CI)."""

from __future__ import annotations

import importlib

import pytest

SCRIPTS = [
    "coreset_speed", "fit_memory", "federated_parity", "codec_tradeoff", "server_selection",
    "system_round", "realistic_parity",
]


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage" in capsys.readouterr().out.lower()
