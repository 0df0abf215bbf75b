"""The Flower round (extra ``flower``): fedserver.flower_app and fedclient.flower_app.

* For real: the commands of docs/flower.md, run as written but for the substitutions below, start a
  flower-superlink and two flower-supernode processes on 127.0.0.1 (insecure, free ports) and
  ``flwr run`` the app; every site's saved bank and the server's bank must equal, bit for bit,
  the bank ``core.federated`` computes in process on the same data (the bank fedserver's daemon is
  tested to give, tests/test_system_e2e.py). All processes are stopped by the test.
* In process: the spec's NumPyClient (FlowerPatchCoreClient) through the same server functions;
  the record layout; every validation error of the run and node configs.

Substitutions made to the page's commands: the ports (9093, 9094, 9095) become free ports; the
sites' ``data='/data/site-X'`` becomes the generated data with one category per site (plus
``coreset-percentage=0.25 overlays=false``, for a small bank and a fast run); ``flower-app``
becomes its absolute path; ``pip install`` is skipped (dev.py installed the ``flower`` extra) and
the server.toml written by ``fedserver init-config`` gets the small random-weight extractor
pinned, as the page says to.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr", reason="flwr is the `flower` extra (dev.py installs it; CI runs this)")

from flwr.app import Array, ArrayRecord
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from safetensors.numpy import load_file

from core.codec import DEFAULT_CODEC
from core.data import AutoVIDataset
from core.federated import FederatedPatchCore
from core.federated.communication import CommunicationProtocol
from core.messages import InvalidMessageError
from fedclient.flower_app import FlowerPatchCoreClient, SiteSettings
from fedserver.config import ConfigError, load_config
from fedserver.flower_app import (
    BANK_STYPE,
    UPLOAD_STYPE,
    FlowerRoundError,
    FlowerRunSettings,
    aggregate_uploads,
    bank_messages,
    messages_from_record,
    messages_to_record,
)
from tests.conftest import SMALL_FEATURES

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "flower.md"
BANK_SIZE = 300
CORESET = 0.25
EXTRACTOR = {
    "backbone": "resnet18", "layers": ["layer2", "layer3"], "pretrained": False,
    "pretrain_embed_dim": 128, "target_embed_dim": 128, "patch_size": 3, "resize": 64,
    "crop": 0, "init_seed": 0,
}
RUN_TIMEOUT_S = 400
SITES = ("a", "b")


def _readme_flower_blocks() -> tuple[list[str], str]:
    """(command lines of the Flower section's bash block, its toml block)."""
    section = PAGE.read_text()
    bash = re.findall(r"^```bash\n(.*?)^```", section, flags=re.DOTALL | re.MULTILINE)
    toml = re.findall(r"^```toml\n(.*?)^```", section, flags=re.DOTALL | re.MULTILINE)
    assert len(bash) == 1 and len(toml) == 1, "docs/flower.md lost its examples"
    return [line for line in bash[0].splitlines() if line.strip()], toml[0]


def _wait_listening(port: int, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Until something accepts connections on 127.0.0.1:``port`` (the SuperLink's port)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the SuperLink exited with {process.returncode}"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def _free_port() -> int:
    # flower-superlink refuses --port 0, so the test picks ports the OS just handed out.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _tool(argv: list[str]) -> list[str]:
    """The console script of this environment (CI does not put the venv's bin/ on PATH)."""
    script = Path(sys.executable).parent / argv[0]
    assert script.is_file(), f"{argv[0]} is not installed beside {sys.executable}"
    return [str(script), *argv[1:]]


def _env(flwr_home: Path) -> dict[str, str]:
    env = os.environ.copy()
    env["FLWR_HOME"] = str(flwr_home)
    # As in an activated virtual environment: the SuperLink and SuperNodes start their helpers
    # (flower-superexec, flwr-serverapp, flwr-clientapp) by name.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"  # the processes share 2 cores
    return env


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group (a SuperNode/SuperLink starts helper processes), then SIGKILL."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # helpers left in the group, if any
    process.wait(20)


@pytest.fixture(scope="module")
def site_categories(synthetic_root: Path) -> dict[str, str]:
    categories = sorted(AutoVIDataset(synthetic_root, split="train").categories)
    return dict(zip(SITES, categories, strict=False))


@pytest.fixture(scope="module")
def reference_bank(synthetic_root: Path, site_categories: dict[str, str]) -> np.ndarray:
    """The bank core.federated computes in process (what the sites decode), for sites a, b."""
    reference = FederatedPatchCore(
        num_clients=len(SITES), backbone=replace(SMALL_FEATURES), global_bank_size=BANK_SIZE,
        coreset_percentage=CORESET, seed=0,
    )
    reference.setup_clients(
        [AutoVIDataset(synthetic_root, [site_categories[s]], split="train") for s in SITES]
    )
    reference.train(num_rounds=1)
    return reference.global_bank


def _server_config(directory: Path, argv: list[str], env: dict[str, str]) -> Path:
    """Run the page's ``fedserver init-config`` and pin the extractor, as the page says to."""
    subprocess.run(_tool(argv), cwd=directory, env=env, check=True, capture_output=True)
    config = directory / "fed" / "server.toml"
    text = config.read_text()
    for key, value in (("global_bank_size", BANK_SIZE), ("device", '"cpu"'),
                       ("max_chunk_bytes", 4096)):
        text, count = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        assert count == 1, key
    lines = ["", "[server.extractor]", *(f"{k} = {json.dumps(v)}" for k, v in EXTRACTOR.items())]
    config.write_text(text + "\n".join(lines) + "\n")
    return config


@pytest.mark.slow
def test_readme_flower_commands_give_the_in_process_bank(
    tmp_path: Path, synthetic_root: Path, site_categories: dict[str, str],
    reference_bank: np.ndarray,
) -> None:
    commands, connection = _readme_flower_blocks()
    assert [c.split()[0] for c in commands] == [
        "pip", "fedserver", "flower-superlink", "flower-supernode", "flower-supernode", "flwr",
    ]
    ports = {"9093": _free_port(), "9094": _free_port(), "9095": _free_port()}

    def substitute(line: str) -> str:
        for old, new in ports.items():
            line = line.replace(f":{old}", f":{new}").replace(f"--port {old}", f"--port {new}")
        for site, category in site_categories.items():
            line = line.replace(
                f"data='/data/site-{site}'",
                f"data='{synthetic_root}' categories='{category}' coreset-percentage={CORESET} "
                "overlays=false",
            )
        return line.replace("flwr run flower-app ", f"flwr run {ROOT / 'flower-app'} ")

    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(substitute(connection))
    env = _env(flwr_home)
    argv = [shlex.split(substitute(line)) for line in commands]
    _server_config(tmp_path, argv[1], env)

    started = time.perf_counter()
    processes: list[subprocess.Popen[bytes]] = []
    logs = {name: tmp_path / f"{name}.log" for name in ("superlink", "supernode-a", "supernode-b")}
    try:
        for name, command in zip(logs, argv[2:5], strict=True):
            with open(logs[name], "wb") as log:
                processes.append(subprocess.Popen(
                    _tool(command), cwd=tmp_path, env=env, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True,
                ))
        # `flwr run` does not wait for the SuperLink: it fails at once if nothing listens yet.
        _wait_listening(int(ports["9093"]), processes[0], timeout_s=120)
        run = subprocess.run(
            _tool(argv[5]), cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=RUN_TIMEOUT_S,
        )
    finally:
        for process in processes:
            _stop(process)
    seconds = time.perf_counter() - started
    assert all(p.returncode is not None for p in processes)
    details = run.stdout[-3000:] + "".join(
        f"\n--- {name}\n{path.read_text(errors='replace')[-2000:]}" for name, path in logs.items()
    )
    assert run.returncode == 0, details
    server_out = tmp_path / "server-out"
    assert (server_out / "round.json").is_file(), details

    summary = json.loads((server_out / "round.json").read_text())
    print(f"\nflower round: {seconds:.1f} s wall (3 daemons + flwr run), server timings "
          f"{summary['seconds']}")
    assert summary["sites"] == list(SITES)
    assert summary["bank_rows"] == reference_bank.shape[0]
    server_bank = load_file(str(server_out / "bank.safetensors"))["memory_bank"]
    # The server's bank is float32 as selected; the sites decode it under the fp16 codec.
    np.testing.assert_array_equal(
        server_bank.astype(np.float16).astype(np.float32), reference_bank
    )
    for site in SITES:
        bank = load_file(str(tmp_path / f"out-{site}" / "bank.safetensors"))["memory_bank"]
        np.testing.assert_array_equal(bank, reference_bank, err_msg=f"site {site}")
        metrics = summary["site_metrics"][site]
        assert metrics["bank-rows"] == BANK_SIZE
        assert 0.0 <= metrics["image-auroc"] <= 1.0  # the synthetic test set was scored
        assert summary["bytes_up"][site] > 0
    # The codec applied on the way up: fp16 + zstd is less than the float32 rows.
    rows_up = sum(summary["rows_up"].values())
    assert sum(summary["bytes_up"].values()) < rows_up * 128 * 4
    assert summary["certificate"] == pytest.approx(
        summary["server_coverage_radius"] + summary["max_site_coverage_radius"]
    )


def test_numpy_client_round_through_the_server_functions_gives_the_in_process_bank(
    tmp_path: Path, synthetic_root: Path, site_categories: dict[str, str],
    reference_bank: np.ndarray,
) -> None:
    """The spec's FlowerPatchCoreClient(dataset, backbone): fit -> the ServerApp's aggregation
    -> evaluate, with the encoded messages as its parameters."""
    config = _write_minimal_config(tmp_path)
    server = load_config(config)
    clients = {
        site: FlowerPatchCoreClient(
            AutoVIDataset(synthetic_root, [category], split="train"), replace(SMALL_FEATURES),
            site_id=site, coreset_percentage=CORESET, global_bank_size=BANK_SIZE,
            test_dataset=AutoVIDataset(synthetic_root, [category], split="test"),
        )
        for site, category in site_categories.items()
    }
    assert all(isinstance(c, NumPyClient) for c in clients.values())
    uploads = {}
    for site, client in clients.items():
        parameters, num_examples, metrics = client.fit([], {})
        assert num_examples == 12 and metrics["site-id"] == site
        assert all(p.dtype == np.uint8 and p.ndim == 1 for p in parameters)
        uploads[site] = [p.tobytes() for p in parameters]
    outcome = aggregate_uploads(server, uploads)
    messages, server_radius = bank_messages(server, outcome)
    assert server_radius >= outcome.server_radius
    for site, client in clients.items():
        loss, count, metrics = client.evaluate(
            [np.frombuffer(m, dtype=np.uint8) for m in messages], {}
        )
        np.testing.assert_array_equal(client.client.global_bank, reference_bank, err_msg=site)
        assert metrics["bank-rows"] == BANK_SIZE and count == 8
        assert loss == pytest.approx(1.0 - metrics["image-auroc"])
    # The Flower 1.42 way to run it: a Client inside a ClientApp (start_numpy_client is gone
    # from the deployment runtime).
    client = clients["a"]
    assert isinstance(ClientApp(client_fn=lambda context: client.to_client()), ClientApp)
    # Without a test set the loss is the certified radius the bank came with.
    bare = FlowerPatchCoreClient(
        AutoVIDataset(synthetic_root, [site_categories["a"]], split="train"),
        replace(SMALL_FEATURES), site_id="a", global_bank_size=BANK_SIZE,
    )
    loss, count, metrics = bare.evaluate([np.frombuffer(m, dtype=np.uint8) for m in messages], {})
    assert loss == pytest.approx(metrics["certificate"]) and count == 12
    # A bank larger than the client accepts is refused before it is decoded.
    small = replace(bare.client.feature_config)
    tiny = FlowerPatchCoreClient(bare.dataset, small, site_id="a", global_bank_size=10)
    with pytest.raises(ValueError, match="rows"):
        tiny.evaluate([np.frombuffer(m, dtype=np.uint8) for m in messages], {})


def _write_minimal_config(directory: Path, **overrides: object) -> Path:
    settings: dict[str, object] = {
        "state_dir": "state", "tokens_file": "tokens", "global_bank_size": BANK_SIZE,
        "device": "cpu", "max_chunk_bytes": 4096, **overrides,
    }
    lines = ["[server]", *(f"{k} = {json.dumps(v)}" for k, v in settings.items())]
    lines += ["[server.extractor]", *(f"{k} = {json.dumps(v)}" for k, v in EXTRACTOR.items())]
    # fedserver's config wants its tokens file to exist, although Flower does not use it.
    (directory / "tokens").write_text(f"a {hashlib.sha256(b'unused').hexdigest()}\n")
    path = directory / "server.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_records_carry_messages_in_order_and_refuse_other_records() -> None:
    messages = [b"\x00\x01", b"", b"x" * 1000]
    record = messages_to_record(messages, UPLOAD_STYPE)
    assert messages_from_record(record, UPLOAD_STYPE) == messages
    with pytest.raises(ValueError, match=re.escape("expected 'fedpatchcore.v1.BankChunk'")):
        messages_from_record(record, BANK_STYPE)
    shuffled = ArrayRecord({
        "00000001": Array(dtype="uint8", shape=(1,), stype=UPLOAD_STYPE, data=b"a"),
        "00000000": Array(dtype="uint8", shape=(1,), stype=UPLOAD_STYPE, data=b"b"),
    })
    with pytest.raises(ValueError, match="keys must be"):
        messages_from_record(shuffled, UPLOAD_STYPE)


def test_server_refuses_bad_uploads(tmp_path: Path) -> None:
    server = load_config(_write_minimal_config(tmp_path))
    with pytest.raises(InvalidMessageError):
        aggregate_uploads(server, {"a": [b"\xff\xff not a message"]})
    rows = np.random.default_rng(0).normal(size=(20, 128)).astype(np.float32)
    messages = CommunicationProtocol.send_to_server("b", rows, codec=DEFAULT_CODEC)
    with pytest.raises(FlowerRoundError, match="site 'a' sent a message of site 'b'"):
        aggregate_uploads(server, {"a": messages})


def test_run_config_errors_name_the_key(tmp_path: Path) -> None:
    config = str(_write_minimal_config(tmp_path))
    ok = FlowerRunSettings.from_run_config({"server-config": config, "num-sites": 2})
    assert ok.num_sites == 2 and ok.out_dir is None and ok.server.global_bank_size == BANK_SIZE
    bad = [
        ({"server-config": config, "num-sites": 2, "rounds": 3}, "unknown run config key"),
        ({"num-sites": 2}, "'server-config' must name"),
        ({"server-config": config}, "'num-sites' must be an int >= 1"),
        ({"server-config": config, "num-sites": True}, "'num-sites' must be an int"),
        ({"server-config": config, "num-sites": 2, "node-wait-s": 0}, "'node-wait-s'"),
        ({"server-config": config, "num-sites": 2, "out-dir": 3}, "'out-dir'"),
    ]
    for run_config, message in bad:
        with pytest.raises(ConfigError, match=message):
            FlowerRunSettings.from_run_config(run_config)
    (tmp_path / "rounds").mkdir()
    two_rounds = str(_write_minimal_config(tmp_path / "rounds", rounds=2))
    with pytest.raises(ConfigError, match="runs one round"):
        FlowerRunSettings.from_run_config({"server-config": two_rounds, "num-sites": 2})
    (tmp_path / "free").mkdir()
    free = tmp_path / "free" / "server.toml"
    free.write_text('[server]\nstate_dir = "s"\ntokens_file = "../tokens"\n')
    with pytest.raises(ConfigError, match="needs the extractor pinned"):
        FlowerRunSettings.from_run_config({"server-config": str(free), "num-sites": 2})
    (tmp_path / "sites").mkdir()
    listed = str(_write_minimal_config(tmp_path / "sites", expected_sites=["a", "b", "c"]))
    with pytest.raises(ConfigError, match="expects 3 site"):
        FlowerRunSettings.from_run_config({"server-config": listed, "num-sites": 2})


def test_node_config_errors_name_the_key() -> None:
    base = {"site-id": "a", "data": "/d", "out-dir": "/o"}
    site = SiteSettings.from_node_config({**base, "categories": "x,y", "device": "cpu"})
    assert site.categories == ("x", "y") and site.device == "cpu" and site.weights is None
    assert SiteSettings.from_node_config(base).categories is None
    bad = [
        ({**base, "colour": 1}, "unknown node config key"),
        ({"data": "/d", "out-dir": "/o"}, "'site-id' must be a non-empty string"),
        ({**base, "coreset-percentage": 0}, "'coreset-percentage' must be in"),
        ({**base, "coreset-percentage": 1.5}, "'coreset-percentage' must be in"),
        ({**base, "batch-size": 0}, "'batch-size' must be an int >= 1"),
        ({**base, "overlays": "no"}, "'overlays' must be true or false"),
    ]
    for node_config, message in bad:
        with pytest.raises(ValueError, match=message):
            SiteSettings.from_node_config(node_config)
