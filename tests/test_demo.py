"""The demo CLI (``python3 dev.py demo``): it generates data only where asked."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from core.data import DatasetError
from core.demo import build_parser, main, run
from fedclient.demo import main as system_main


@pytest.mark.parametrize("demo_main", [main, system_main], ids=["in-process", "system"])
def test_missing_data_folder_is_an_error_not_a_generated_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], demo_main: Callable[[list[str]], int]
) -> None:
    typo = tmp_path / "typo"
    with pytest.raises(SystemExit) as caught:
        demo_main(["--data", str(typo)])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert str(typo) in err and "does not exist" in err and "--generate" in err
    assert not typo.exists()  # nothing was generated at the typo


def test_empty_data_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="is empty"):
        run(build_parser().parse_args(["--data", str(tmp_path)]))
    assert list(tmp_path.iterdir()) == []


def test_generate_refuses_a_folder_with_files(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("a user's file")
    with pytest.raises(DatasetError, match="not an empty folder"):
        run(build_parser().parse_args(["--data", str(tmp_path), "--generate"]))
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_generate_needs_data(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--generate"])
    assert "--generate needs --data" in capsys.readouterr().err


@pytest.mark.parametrize("demo_main", [main, system_main], ids=["in-process", "system"])
def test_pretrained_without_network_is_one_line_not_a_traceback_per_site(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    demo_main: Callable[[list[str]], int],
) -> None:
    """`dev.py demo --pretrained` offline printed four tracebacks (one per site process)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    code = demo_main(["--pretrained", "--image-size", "32"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("demo: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "without --pretrained" in lines[0] and "--weights FILE" in lines[0]
