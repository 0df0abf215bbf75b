"""benchmarks.scale and benchmarks.peers: one real round end to end, the counting proxy against
the kernel's counters, the backbone weight copy into anomalib, growth words, argument parsing."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
import torch

from benchmarks import peers, scale
from benchmarks.netcount import CountingProxy


@pytest.mark.slow  # starts fedserver init-config and a fedserver process (about 10 s idle)
def test_scale_round_two_sites_counts_every_site(tmp_path: Path) -> None:
    result = scale.run_round(2, 200, tmp_path / "run", proxy=True, keep_arrays=tmp_path / "arr")
    assert result.sites == 2 and result.rows_per_site == 200  # floor(2 * 200 / 2)
    assert result.bank_rows == 200
    # Every site's connection counted, and each carried at least its own messages.
    assert len(result.tcp_up) == len(result.tcp_down) == 2
    for tcp, msg in zip(sorted(result.tcp_up), sorted(result.msg_up), strict=True):
        assert msg <= tcp < 1.05 * msg
    for tcp, msg in zip(sorted(result.tcp_down), sorted(result.msg_down), strict=True):
        assert msg <= tcp < 1.05 * msg
    # fp16 + zstd of 200 x 1024 float32 rows: well under the raw bytes, over a quarter of them.
    assert 0.25 < min(result.msg_up) / result.raw_up_per_site < 0.6
    # The proxy's byte count (per connection, in user space) agrees with the kernel's.
    assert sorted(result.proxy_up) == pytest.approx(sorted(result.tcp_up), rel=0.005)
    assert sorted(result.proxy_down) == pytest.approx(sorted(result.tcp_down), rel=0.005)
    assert 0 < result.rss_idle_mib <= result.rss_peak_mib
    assert 0 <= result.selection_s <= result.round_s
    assert result.upload_s <= result.round_s
    assert sorted(p.name for p in (tmp_path / "arr").iterdir()) == [
        "bank.npy", "site-0.npy", "site-1.npy"
    ]


def test_counting_proxy_counts_both_directions() -> None:
    with socket.create_server(("127.0.0.1", 0)) as upstream:
        port = upstream.getsockname()[1]

        def echo_doubled() -> None:
            conn, _ = upstream.accept()
            with conn:
                data = b""
                while len(data) < 1000:
                    data += conn.recv(4096)
                conn.sendall(data * 2)

        thread = threading.Thread(target=echo_doubled)
        thread.start()
        proxy = CountingProxy(("127.0.0.1", port), drain_s=0.0)
        try:
            with socket.create_connection(("127.0.0.1", proxy.port)) as client:
                client.sendall(b"x" * 1000)
                received = b""
                while len(received) < 2000:
                    received += client.recv(4096)
            thread.join(5)
        finally:
            proxy.close()
    assert received == b"x" * 2000
    assert proxy.per_connection() == [(1000, 2000)]


@pytest.mark.parametrize(
    ("ys", "word"),
    [([5, 5, 5.2, 5], "flat"), ([1, 2, 4, 8], "linear"), ([8, 4, 2, 1], "falls as 1/x"),
     ([1, 4, 16, 64], "super-linear"), ([1, 1.4, 2, 2.8], "sub-linear")],
)
def test_classify_growth(ys: list[float], word: str) -> None:
    assert scale.classify_growth([1, 2, 4, 8], ys)[1] == word


def test_classify_growth_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="matching points"):
        scale.classify_growth([1], [1])
    with pytest.raises(ValueError, match="positive"):
        scale.classify_growth([1, 2], [0, 1])


@pytest.mark.parametrize(
    "argv",
    [["--repeats", "0"], ["--sites", "0", "2"], ["--sites", "2", "2"],
     ["--share", "0"], ["--fixed-bank", "0"]],
)
def test_scale_rejects_bad_arguments(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        scale.main(argv)
    assert exit_info.value.code == 2


def test_scale_parser_defaults() -> None:
    args = scale.build_parser().parse_args([])
    assert not args.full and args.repeats == 3 and args.share == 2.0 and not args.record


@pytest.mark.parametrize(
    "argv",
    [["--parts", "nope"], ["--repeats", "0"], ["--num-test", "1"], ["--image-size", "8"],
     ["--flower-sites", "0"], ["--coreset-rows", "10"]],
)
def test_peers_rejects_bad_arguments(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        peers.main(argv)
    assert exit_info.value.code == 2


def test_peers_parser_defaults() -> None:
    args = peers.build_parser().parse_args([])
    assert args.parts == list(peers.PARTS) and args.backbone == "wide_resnet50_2"
    assert args.flwr_venv == peers.DEFAULT_FLWR_VENV


def test_weight_copy_gives_anomalib_our_backbone_features() -> None:
    pytest.importorskip("anomalib")
    from benchmarks.common import random_feature_config
    from core.patchcore import PatchCore, PatchCoreConfig

    features = random_feature_config("resnet18", 64, init_seed=0)
    ours = PatchCore(PatchCoreConfig(features=features, device="cpu"))
    torch.manual_seed(123)  # anomalib's own random init differs from ours
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    theirs = PatchcoreModel(layers=["layer2", "layer3"], backbone="resnet18", pre_trained=False)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = theirs.feature_extractor(images)
    copied = peers.copy_backbone_weights(ours.extractor.backbone,
                                         theirs.feature_extractor.feature_extractor)
    assert copied == len(ours.extractor.backbone.state_dict())
    with torch.no_grad():
        our_maps = ours.extractor.backbone(images)
        their_maps = theirs.feature_extractor(images)
    assert list(their_maps) == ["layer2", "layer3"]
    assert not torch.equal(before["layer2"], our_maps[0])  # the copy is what makes them equal
    for ours_map, their_map in zip(our_maps, their_maps.values(), strict=True):
        assert torch.equal(ours_map, their_map)


def test_weight_copy_refuses_a_different_architecture() -> None:
    source = torch.nn.Sequential(torch.nn.Linear(3, 4))
    with pytest.raises(peers.WeightCopyError, match="only in source"):
        peers.copy_backbone_weights(source, torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1),
                                                                torch.nn.Linear(3, 4)))
    with pytest.raises(peers.WeightCopyError, match=r"tensor 0\.weight"):
        peers.copy_backbone_weights(source, torch.nn.Sequential(torch.nn.Linear(3, 5)))
