"""Shared fixtures. GPU tests are marked automatically and skipped only where CUDA is missing."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from core.data import generate_synthetic_dataset
from core.features import FeatureConfig
from core.preprocess import ImageTransform

#: The backbone CPU tests use: small, random weights (no network), 64 px inputs.
SMALL_FEATURES = FeatureConfig(
    backbone="resnet18",
    pretrained=False,
    pretrain_embed_dim=128,
    target_embed_dim=128,
    transform=ImageTransform(resize=64, crop=None),
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    # The reliability campaign (tests/test_reliability_*.py) is marked `reliability`; its slow
    # part, `reliability(full=True)`, runs only when asked for: `pytest -m reliability`.
    skip_campaign = pytest.mark.skip(
        reason="full reliability campaign: run `pytest -m reliability`"
    )
    campaign = "reliability" in (config.getoption("markexpr", "") or "")
    for item in items:
        full = any(m.kwargs.get("full") for m in item.iter_markers("reliability"))
        if full and not campaign:
            item.add_marker(skip_campaign)
        if "cuda_device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """Undo what a CLI's main() does to the root logger when a test calls it in process.

    ``fedserver serve`` configures logging with ``force=True``: its stderr handler would outlive
    the test, write into that test's closed capture file and print "--- Logging error ---" into
    later tests' stderr.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):  # pytest's own capture handlers come and go per phase
        if handler not in handlers and not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


@pytest.fixture
def cuda_device() -> torch.device:
    return torch.device("cuda")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated dataset in the AutoVI layout (3 categories, 64 px), shared read-only."""
    root = tmp_path_factory.mktemp("synthetic") / "data"
    return generate_synthetic_dataset(
        root,
        categories=("stripes", "washer", "screw"),
        num_train=12,
        num_test=8,
        image_size=64,
        seed=0,
        layout="autovi",
    )


@pytest.fixture
def small_features() -> FeatureConfig:
    return SMALL_FEATURES
