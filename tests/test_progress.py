"""Progress bars: on for a terminal or when asked, off otherwise (tests and logs stay clean)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from tqdm import tqdm

from core.features import FeatureConfig
from core.patchcore import PatchCore, PatchCoreConfig
from core.progress import progress_enabled, set_progress


class Blank:
    """Four 64 px images of noise (no files needed)."""

    def __len__(self) -> int:
        return 4

    def load_image(self, index: int) -> np.ndarray:
        rng = np.random.default_rng(index)
        return rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)


@pytest.fixture(autouse=True)
def default_setting(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("FEDPATCHCORE_PROGRESS", raising=False)
    set_progress(None)
    yield
    set_progress(None)


def _fit_and_score(features: FeatureConfig) -> None:
    model = PatchCore(PatchCoreConfig(features=features, coreset_ratio=0.5, batch_size=2))
    model.fit(Blank()).predict(Blank())


class _EveryUpdate(tqdm):  # type: ignore[type-arg]
    """tqdm that draws every update: the default redraws at most every 0.1 s, so on a loaded
    machine the last count (4/4) may never be drawn before the bar is cleared."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, mininterval=0, miniters=1, **kwargs)


def test_bars_show_feature_extraction_selection_and_scoring_when_enabled(
    small_features: FeatureConfig,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("core.progress.tqdm", _EveryUpdate)
    set_progress(True)
    _fit_and_score(small_features)
    err = capsys.readouterr().err
    assert "fit" in err and "4/4" in err  # images through the backbone and the selector
    assert "coreset 128 of 256 rows" in err  # 4 images x 8 x 8 patches -> 50 %
    assert "scoring" in err


def test_bars_are_off_when_stderr_is_not_a_terminal_or_when_disabled(
    small_features: FeatureConfig,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert not progress_enabled()  # pytest's captured stderr is not a terminal
    _fit_and_score(small_features)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    monkeypatch.setenv("FEDPATCHCORE_PROGRESS", "0")
    assert not progress_enabled()
    monkeypatch.setenv("FEDPATCHCORE_PROGRESS", "1")
    assert progress_enabled()
    set_progress(False)  # the argument wins over the environment
    assert not progress_enabled()
    monkeypatch.setenv("FEDPATCHCORE_PROGRESS", "yes")
    set_progress(None)
    with pytest.raises(ValueError, match="must be 0 or 1"):
        progress_enabled()
