"""Every ```python block of README.md and of the pages in docs/ runs, in order, one namespace per
page.

A page documents the one substitution made here: its block marked ``# setup`` (data paths and
backbone weights), which must be its first, is replaced by SETUP below, generated data and a
random-weight resnet18, because CI has neither the datasets nor network. Every other block runs
exactly as written.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.data import generate_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

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


def _run_page(page: Path, blocks: list[str], mvtec: Path, autovi: Path) -> dict[str, object]:
    namespace: dict[str, object] = {"__name__": "readme"}
    if blocks[0].startswith("# setup\n"):
        # The setup block defines exactly what SETUP replaces; it must at least be valid Python.
        compile(blocks[0], f"{page.name} setup", "exec")
        for name in ("MVTEC_ROOT", "AUTOVI_ROOT", "features"):
            assert re.search(rf"^{name} = ", blocks[0], flags=re.MULTILINE), (page, name)
        exec(SETUP.format(mvtec=str(mvtec), autovi=str(autovi)), namespace)
        blocks = blocks[1:]
    for i, block in enumerate(blocks, start=1):
        exec(compile(block, f"{page.name} python block {i}", "exec"), namespace)
    return namespace


def test_readme_and_docs_python_blocks_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pages = {page: python_blocks(page.read_text(encoding="utf-8")) for page in PAGES}
    pages = {page: blocks for page, blocks in pages.items() if blocks}
    api = ROOT / "docs" / "python-api.md"
    assert len(pages.get(api, [])) >= 3, "docs/python-api.md lost its python examples"
    for page, blocks in pages.items():
        setup = [i for i, b in enumerate(blocks) if b.startswith("# setup\n")]
        assert setup in ([], [0]), f"{page}: a '# setup' block must be the page's first"

    mvtec = generate_synthetic_dataset(
        tmp_path / "mvtec", categories=("washer",), num_train=6, num_test=6, image_size=64
    )
    (mvtec / "washer").rename(mvtec / "bottle")  # the docs' MVTec category
    autovi = generate_synthetic_dataset(
        tmp_path / "autovi", num_train=6, num_test=4, image_size=64, layout="autovi"
    )
    monkeypatch.chdir(tmp_path)  # the examples save to relative paths
    namespaces = {page: _run_page(page, blocks, mvtec, autovi) for page, blocks in pages.items()}
    assert (tmp_path / "bottle.safetensors").is_file()
    assert (tmp_path / "outputs/federated/global_model.safetensors").is_file()
    assert namespaces[api]["maps"].shape[1:] == (64, 64)  # type: ignore[attr-defined]
