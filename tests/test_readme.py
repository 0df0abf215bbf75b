"""Every ```python block of README.md runs, in order, in one namespace.

The README documents the one substitution made here: its block marked ``# setup`` (data paths
and backbone weights) is replaced by SETUP below, generated data and a random-weight resnet18,
because CI has neither the datasets nor network. Every other block runs exactly as written.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.data import generate_synthetic_dataset

README = Path(__file__).resolve().parents[1] / "README.md"

SETUP = """
from core.features import FeatureConfig
from core.preprocess import ImageTransform

MVTEC_ROOT = {mvtec!r}
AUTOVI_ROOT = {autovi!r}
features = FeatureConfig(
    "resnet18",
    pretrained=False,  # random weights, passed explicitly: no network in CI
    pretrain_embed_dim=128,
    target_embed_dim=128,
    transform=ImageTransform(resize=64, crop=None),
)
"""


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_readme_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 3, "README lost its python examples"
    setup = [i for i, b in enumerate(blocks) if b.startswith("# setup\n")]
    assert setup == [0], "the README's first python block must be its one '# setup' block"
    # The setup block defines exactly what SETUP replaces; it must at least be valid Python.
    compile(blocks[0], "README setup", "exec")
    for name in ("MVTEC_ROOT", "AUTOVI_ROOT", "features"):
        assert re.search(rf"^{name} = ", blocks[0], flags=re.MULTILINE), name

    mvtec = generate_synthetic_dataset(
        tmp_path / "mvtec", categories=("washer",), num_train=6, num_test=6, image_size=64
    )
    (mvtec / "washer").rename(mvtec / "bottle")  # the README's MVTec category
    autovi = generate_synthetic_dataset(
        tmp_path / "autovi", num_train=6, num_test=4, image_size=64, layout="autovi"
    )
    monkeypatch.chdir(tmp_path)  # the examples save to relative paths
    namespace: dict[str, object] = {"__name__": "readme"}
    exec(SETUP.format(mvtec=str(mvtec), autovi=str(autovi)), namespace)
    for i, block in enumerate(blocks[1:], start=1):
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
    assert (tmp_path / "bottle.safetensors").is_file()
    assert (tmp_path / "outputs/federated/global_model.safetensors").is_file()
    assert namespace["maps"].shape[1:] == (64, 64)  # type: ignore[attr-defined]
