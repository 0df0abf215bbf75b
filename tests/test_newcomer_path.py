"""The path a new user walks: README's "Run a server and three sites", with real processes.

The README's own commands are read from its section and run as written, with these
substitutions only: the server binds 127.0.0.1:0 (the port it logs replaces 50051), paths point
into a temporary folder (each site's token file is the one ``fedserver init-config`` wrote,
copied where the README's command expects it), and every ``fedclient`` command gets
``--no-pretrained`` (CI has no network and no weights cache). Everything else is the defaults: a
fresh ``fedserver init-config`` (no extractor pinned, bank 10,000 rows) and the site's default
extractor, wide_resnet50_2 at resize 256 / crop 224 (random weights). The data is the synthetic
MVTec AD layout, one category per site, small (64 px, 4 training and 4 test images per site) so
the whole path runs in well under a minute; plant-3's ``--data`` is its category folder itself.

It checks what the issue found broken on this path:

* with the defaults every site exits 0 and writes metrics.json and report.html with metrics (the
  centre crop is scored on the pixels the model saw, and the report says so), and so does
  ``fedclient score`` with the bank a site downloaded;
* both name the weights' provenance (random, prominently);
* offline with the default (pretrained) weights a site exits 2 before it joins: one line on
  stderr naming the flags, no traceback, nothing in the server's log;
* a site whose ``--out`` holds the bank of an earlier federation replaces it, saying why in one
  line.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.data import generate_synthetic_dataset
from fedclient.demo import ServerProcess
from tests.test_readme_commands import bash_blocks

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTION = "## Run a server and three sites"
SITES = ("plant-1", "plant-2", "plant-3")
CATEGORIES = ("mesh", "screw", "washer")
TIMEOUT_S = 300


def readme_commands() -> list[list[str]]:
    """The command lines (as words) of the README section's bash block."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index(SECTION + "\n"):]
    section = section[: section.index("\n## ", 1)]
    blocks = bash_blocks(section)
    assert len(blocks) == 1, f"README's {SECTION!r} section must hold one bash block"
    return [shlex.split(line, comments=True) for line in blocks[0]]


def _command(commands: list[list[str]], *prefix: str) -> list[str]:
    found = [c for c in commands if tuple(c[: len(prefix)]) == prefix]
    assert found, f"README's {SECTION!r} lost its `{' '.join(prefix)}` command"
    return found[0]


def _env(**extra: str) -> dict[str, str]:
    env = os.environ.copy()
    env["OMP_NUM_THREADS"] = "1"  # four processes share the cores
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "protos")])
    env.update(extra)
    return env


def _site_argv(words: list[str], site: str, address: str, data: Path, out: Path) -> list[str]:
    """A README ``fedclient`` command for ``site``: plant-1's words with this site's names."""
    number = site.rsplit("-", 1)[1]
    replaced = []
    for word in words[1:]:
        word = word.replace("127.0.0.1:50051", address)
        word = word.replace("plant-1", site).replace("plant1", f"plant{number}")
        if word in (f"/data/plant{number}", "/data/new-images"):
            word = str(data)
        word = word.replace(f"plant{number}-out", str(out))
        replaced.append(word)
    return [sys.executable, "-m", "fedclient", *replaced]


@pytest.fixture(scope="module")
def plants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each site's --data: an MVTec AD dataset of one category (plant-3: its category folder)."""
    base = tmp_path_factory.mktemp("plants")
    data = {}
    for site, category in zip(SITES, CATEGORIES, strict=True):
        number = site.rsplit("-", 1)[1]
        root = generate_synthetic_dataset(base / f"plant{number}", categories=(category,),
                                          num_train=4, num_test=4, image_size=64,
                                          seed=int(number), layout="mvtec")
        data[site] = root / category if site == "plant-3" else root
    return data


def test_the_readme_path_with_defaults_ends_with_metrics_and_reports(
    plants: dict[str, Path], tmp_path: Path
) -> None:
    commands = readme_commands()
    init = _command(commands, "fedserver", "init-config")
    _command(commands, "fedserver", "serve")
    check = _command(commands, "fedclient", "check")
    run = _command(commands, "fedclient", "run")
    score = _command(commands, "fedclient", "score")
    subprocess.run([sys.executable, "-m", "fedserver", *init[1:]], cwd=tmp_path, env=_env(),
                   check=True, capture_output=True, text=True, timeout=TIMEOUT_S)
    for site in SITES:  # what the server's operator hands to each site
        shutil.copy(tmp_path / "fed" / "site-tokens" / f"{site}.token", tmp_path / f"{site}.token")
    server = ServerProcess(tmp_path / "fed" / "server.toml", tmp_path / "server.log", env=_env())
    try:
        outs = {site: tmp_path / f"plant{site[-1]}-out" for site in SITES}

        # Offline with the default weights: refused before joining, in one line (plant-2);
        # meanwhile `fedclient check` as the README shows it: data, server and weights (plant-1).
        offline = tmp_path / "cold-cache"
        offline.mkdir()
        refusing = subprocess.Popen(
            _site_argv(run, "plant-2", server.address, plants["plant-2"], outs["plant-2"]),
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(offline), TORCH_HOME=str(offline)),
        )
        argv = _site_argv(check, "plant-1", server.address, plants["plant-1"], outs["plant-1"])
        checked = subprocess.run([*argv, "--no-pretrained"], cwd=tmp_path, capture_output=True,
                                 text=True, timeout=TIMEOUT_S, env=_env())
        _, refused = refusing.communicate(timeout=TIMEOUT_S)
        assert refusing.returncode == 2, refused
        assert refused.count("\n") == 1 and "Traceback" not in refused, refused
        assert "--weights FILE" in refused and "--no-pretrained" in refused
        assert "site plant-2 joined" not in server.log_path.read_text(encoding="utf-8")
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "ok   extractor wide_resnet50_2" in checked.stdout
        assert "224x224 centre crop" in checked.stdout

        processes = {
            site: subprocess.Popen(
                [*_site_argv(run, site, server.address, plants[site], outs[site]),
                 "--no-pretrained"],
                cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True,
            )
            for site in SITES
        }
        results = {site: p.communicate(timeout=TIMEOUT_S) for site, p in processes.items()}
        for site, process in processes.items():
            assert process.returncode == 0, f"{site}: {results[site][1][-3000:]}"
    finally:
        server.stop()

    for site in SITES:
        metrics = json.loads((outs[site] / "metrics.json").read_text(encoding="utf-8"))
        test = metrics["test"]
        assert test["num_images"] == 4 and 0 < test["num_anomalous"] < 4
        for key in ("image_auroc", "pixel_auroc", "au_pro"):
            assert isinstance(test[key], float), (site, key, test[key])
        assert test["resolution"] == "model" and "224x224 centre crop" in test["protocol"]
        assert metrics["num_train_images"] == 4  # train/good only: nothing of test/
        assert metrics["weights"]["kind"] == "random"
        page = (outs[site] / "report.html").read_text(encoding="utf-8")
        assert re.search(r'<p class="bad" id="weights">RANDOM weights', page), site
        assert f"{test['image_auroc']:.4f}" in page and "224x224 centre crop" in page
        summary = results[site][0]
        assert f"image_auroc {test['image_auroc']:.3f}" in summary, summary

    # `fedclient score` with the bank plant-1 downloaded: the same crop, the same protocol.
    scored = subprocess.run(
        _site_argv(score, "plant-1", "", plants["plant-1"], outs["plant-1"]), cwd=tmp_path,
        capture_output=True, text=True, timeout=TIMEOUT_S, env=_env(),
    )
    assert scored.returncode == 0, scored.stderr[-3000:]
    metrics = json.loads((tmp_path / "scored" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["test"]["resolution"] == "model" and metrics["weights"]["kind"] == "random"
    assert isinstance(metrics["test"]["pixel_auroc"], float)


def test_a_stale_bank_from_an_earlier_federation_is_replaced(
    plants: dict[str, Path], tmp_path: Path
) -> None:
    """After a federation ends (or the server is reset), a new one starts at bank version 1
    again: the site's saved v1 is another federation's bank (here of 10 rows; the new bank
    holds all of the site's coreset). It is replaced, with one line."""
    out = tmp_path / "plant1-out"
    runs = []
    for federation, bank_size in (("fed-old", "10"), ("fed-new", "10000")):
        subprocess.run([sys.executable, "-m", "fedserver", "init-config", "--sites", "plant-1",
                        "--dir", federation, "--global-bank-size", bank_size], cwd=tmp_path,
                       env=_env(), check=True, capture_output=True, timeout=TIMEOUT_S)
        server = ServerProcess(tmp_path / federation / "server.toml",
                               tmp_path / f"{federation}.log", env=_env())
        try:
            runs.append(subprocess.run(
                [sys.executable, "-m", "fedclient", "run", "--server", server.address,
                 "--site-id", "plant-1", "--token-file",
                 str(tmp_path / federation / "site-tokens" / "plant-1.token"),
                 "--data", str(plants["plant-1"]), "--out", str(out),
                 "--no-pretrained", "--backbone", "resnet18", "--image-size", "64"],
                cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S,
            ))
        finally:
            server.stop()
        assert runs[-1].returncode == 0, runs[-1].stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    record = metrics["rounds"][0]
    assert record["bank_version"] == 1 and not record["bank_delta"]
    assert metrics["bank_rows"] > 10
    assert "has 10 rows, the header says" in record["bank_replaced"], record["bank_replaced"]
    warnings = [line for line in runs[1].stderr.splitlines() if "is not the server's" in line]
    assert len(warnings) == 1 and "full bank" in warnings[0], runs[1].stderr
    assert "is not the server's" not in runs[0].stderr
