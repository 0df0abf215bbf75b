"""Shared fixtures. GPU tests are marked automatically and skipped only where CUDA is missing."""

from __future__ import annotations

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
