"""A site of the Flower round: ClientApp on flwr's Message API, and the spec's NumPyClient.

``app`` (a :class:`flwr.clientapp.ClientApp`) is what ``fedclient run`` does in one round, with
the same pieces: on the TRAIN message it reads the round's rules (the fedpatchcore.v1.RoundConfig
fedserver.flower_app sends), fits the local coreset with core's
:class:`~core.federated.PatchCoreClient` and replies with its upload encoded by core's codec
(the SiteSummary and the FeatureChunks as serialized UploadFeaturesRequest messages, one
``Array`` of bytes each); on the EVALUATE message it decodes the bank (core.serde's
ChunkAssembler: order, checksums, bounds), saves it as ``bank.safetensors`` (a PatchCore model
file, as fedclient saves it) and scores the site's test images when it has any.

The SuperNode's ``--node-config`` says who the site is and where its data lie (keys below; a
.toml file works too). The ClientApp runs in its own process per message, so nothing is kept in
memory between TRAIN and EVALUATE: the model is rebuilt from the rules and the bank.

:class:`FlowerPatchCoreClient` is the spec's ``fl.client.NumPyClient`` (get_parameters / fit /
evaluate). Its parameters are the encoded wire messages as uint8 arrays (the upload from
``fit``, the bank into ``evaluate``), so the codecs apply here too; :func:`site_upload` and
fedserver.flower_app's ``aggregate_uploads`` / ``bank_messages`` are the shared pieces.
``fl.client.start_numpy_client`` is deprecated since flwr 1.7; 1.42 keeps it only in
``flwr.compat``, on the legacy gRPC transport that a SuperLink does not speak. A NumPyClient now
runs inside a ClientApp, ``ClientApp(client_fn=lambda context:
FlowerPatchCoreClient(...).to_client())`` under ``flower-supernode``, and needs a ServerApp that
speaks the legacy fit/evaluate records (``fitins.*`` / ``fitres.*``); the ServerApp of this
project speaks the Message-API records of ``app`` above, so use ``app`` with it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp

from core.codec import CodecConfig
from core.features import FeatureConfig
from core.federated import UPLOAD_FACTOR, PatchCoreClient, UploadBudget
from core.federated.communication import receive_bank
from core.patchcore import ImageSource
from core.serde import upload_request_to_proto
from fedclient.session import FingerprintMismatchError, RoundConfig
from fedclient.site import BANK_FILE, _score, load_site_data
from fedpatchcore.v1 import federation_pb2 as fpb
from fedserver.flower_app import (
    BANK_KEY,
    BANK_STYPE,
    ROUND_CONFIG_KEY,
    SITE_KEY,
    UPLOAD_KEY,
    UPLOAD_STYPE,
    messages_from_record,
    messages_to_record,
)

logger = logging.getLogger(__name__)

__all__ = ["FlowerPatchCoreClient", "SiteSettings", "app", "site_upload"]


@dataclass(frozen=True)
class SiteSettings:
    """A SuperNode's ``--node-config`` (keys in quotes).

    site_id ("site-id"): the site's name on the wire. data ("data"): the site's folder, as for
    ``fedclient run --data``. out_dir ("out-dir"): where bank.safetensors, metrics and overlays
    go. categories ("categories"): comma-separated object folders, "" = all.
    coreset_percentage ("coreset-percentage", unset: the upload is sized from the round's k as
    in ``fedclient run``), upload_factor ("upload-factor"), seed ("seed"), batch_size
    ("batch-size"),
    device ("device", "" = CUDA when available), weights ("weights", local backbone weights for a
    pretrained extractor, "" = none), overlays ("overlays"): as ``fedclient run``.
    """

    site_id: str
    data: Path
    out_dir: Path
    categories: tuple[str, ...] | None = None
    coreset_percentage: float | None = None
    upload_factor: float = UPLOAD_FACTOR
    seed: int = 0
    batch_size: int = 8
    device: str | None = None
    weights: str | None = None
    overlays: bool = True

    @classmethod
    def from_node_config(cls, config: Mapping[str, Any]) -> SiteSettings:
        """Validate a node config; ValueError naming the key otherwise."""
        known = {"site-id", "data", "out-dir", "categories", "coreset-percentage",
                 "upload-factor", "seed", "batch-size", "device", "weights", "overlays"}
        unknown = set(config) - known
        if unknown:
            raise ValueError(
                f"unknown node config key(s) {sorted(unknown)}; known: {sorted(known)}"
            )
        for key in ("site-id", "data", "out-dir"):
            if not isinstance(config.get(key), str) or not config[key]:
                raise ValueError(f"node config {key!r} must be a non-empty string")
        percentage = config.get("coreset-percentage")
        if percentage is not None and (
            isinstance(percentage, bool) or not isinstance(percentage, int | float)
            or not 0 < percentage <= 1
        ):
            raise ValueError(
                f"node config 'coreset-percentage' must be in (0, 1], got {percentage!r}"
            )
        factor = config.get("upload-factor", UPLOAD_FACTOR)
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not (
            math.isfinite(factor) and factor > 0
        ):
            raise ValueError(f"node config 'upload-factor' must be a number > 0, got {factor!r}")
        ints = {}
        for key, default, low in (("seed", 0, 0), ("batch-size", 8, 1)):
            value = config.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"node config {key!r} must be an int >= {low}, got {value!r}")
            ints[key] = value
        overlays = config.get("overlays", True)
        if not isinstance(overlays, bool):
            raise ValueError(f"node config 'overlays' must be true or false, got {overlays!r}")
        categories = str(config.get("categories", ""))
        return cls(
            site_id=config["site-id"],
            data=Path(config["data"]),
            out_dir=Path(config["out-dir"]),
            categories=tuple(c for c in categories.split(",") if c) or None,
            coreset_percentage=None if percentage is None else float(percentage),
            upload_factor=float(factor),
            seed=ints["seed"],
            batch_size=ints["batch-size"],
            device=str(config.get("device", "")) or None,
            weights=str(config.get("weights", "")) or None,
            overlays=overlays,
        )


def _rules(content: RecordDict) -> RoundConfig:
    data = content[ROUND_CONFIG_KEY]["round-config"]
    if not isinstance(data, bytes):
        raise ValueError(f"{ROUND_CONFIG_KEY}: 'round-config' must be bytes")
    return RoundConfig.from_proto(fpb.RoundConfig.FromString(data))


def _features(rules: RoundConfig, weights: str | None) -> FeatureConfig:
    features = rules.feature_config(weights=weights)
    if features is None:
        raise ValueError("the round's rules pin no feature extractor")
    if rules.feature_fingerprint and features.fingerprint() != rules.feature_fingerprint:
        raise FingerprintMismatchError(
            f"feature extractor mismatch: this site's fingerprint {features.fingerprint()[:12]}... "
            f"differs from the federation's {rules.feature_fingerprint[:12]}..."
        )
    return features


def site_upload(
    client: PatchCoreClient, round_number: int, codec: CodecConfig, max_chunk_bytes: int
) -> list[bytes]:
    """A fitted client's round-1 upload as serialized UploadFeaturesRequest messages: its
    SiteSummary, then its coreset's chunks; exactly what ``fedclient run`` streams."""
    summary, chunks = client.encode_upload(round_number, client.get_coreset(), codec,
                                           max_chunk_bytes=max_chunk_bytes)
    return [upload_request_to_proto(item).SerializeToString() for item in (summary, *chunks)]


def _client(site: SiteSettings, train: ImageSource, features: FeatureConfig,
            rules: RoundConfig) -> PatchCoreClient:
    budget = None if site.coreset_percentage is not None else UploadBudget(
        rules.global_bank_size, rules.expected_sites, rules.max_rows_per_site, site.upload_factor
    )
    return PatchCoreClient(
        site.site_id, train, features, site.coreset_percentage, upload_budget=budget,
        seed=site.seed, device=site.device, batch_size=site.batch_size,
    )


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Fit the local coreset under the round's rules and reply with the encoded upload."""
    site = SiteSettings.from_node_config(context.node_config)
    rules = _rules(msg.content)
    features = _features(rules, site.weights)
    train_set, _ = load_site_data(site.data, site.categories)
    client = _client(site, train_set, features, rules)
    t0 = time.perf_counter()
    client.train()
    fit_seconds = time.perf_counter() - t0
    messages = site_upload(client, rules.round, rules.codec, rules.max_chunk_bytes)
    logger.info(
        "site %s: %d coreset rows in %d message(s), %d B", site.site_id,
        client.get_coreset().shape[0], len(messages), sum(len(m) for m in messages),
    )
    content = RecordDict({
        UPLOAD_KEY: messages_to_record(messages, UPLOAD_STYPE),
        SITE_KEY: ConfigRecord({"site-id": site.site_id}),
        "metrics": MetricRecord({
            "num-images": len(train_set),
            "coreset-rows": int(client.get_coreset().shape[0]),
            "bytes-up": sum(len(m) for m in messages),
            "fit-seconds": fit_seconds,
        }),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Decode the bank, save it as bank.safetensors and score the site's test images."""
    site = SiteSettings.from_node_config(context.node_config)
    messages = messages_from_record(msg.content[BANK_KEY], BANK_STYPE)
    rules = _rules(msg.content)  # resent with the bank: no state survives between messages
    train_set, test_set = load_site_data(site.data, site.categories)
    delivery = receive_bank(messages, max_rows=rules.global_bank_size)
    client = _client(site, train_set, _features(rules, site.weights), rules)
    client.update_global_bank(delivery.bank)
    client.model.coverage_radius = delivery.server_radius + delivery.max_site_radius
    site.out_dir.mkdir(parents=True, exist_ok=True)
    client.model.save(
        site.out_dir / BANK_FILE,
        extra={
            "round": delivery.round,
            "server_coverage_radius": delivery.server_radius,
            "max_site_coverage_radius": delivery.max_site_radius,
            "pretrained": client.feature_config.pretrained,
            "transport": "flower",
        },
    )
    metrics: dict[str, int | float] = {
        "bank-rows": int(delivery.bank.shape[0]),
        "bytes-down": sum(len(m) for m in messages),
    }
    if test_set is not None:
        scores = _score(client.model, test_set, site.out_dir, site.overlays, None,
                        report=False).result
        for name in ("image_auroc", "pixel_auroc"):
            value = scores.get(name)
            if isinstance(value, float):
                metrics[name.replace("_", "-")] = value
    content = RecordDict({
        SITE_KEY: ConfigRecord({"site-id": site.site_id}),
        "metrics": MetricRecord(metrics),
    })
    return Message(content=content, reply_to=msg)


class FlowerPatchCoreClient(NumPyClient):
    """Flower-compatible PatchCore client (the spec's NumPyClient style).

    Args:
        dataset: the site's training images (``len`` and ``load_image(i)``).
        backbone: timm backbone name or a full :class:`~core.features.FeatureConfig`.
        site_id: the site's name on the wire.
        coreset_percentage / seed / device / batch_size: as core.federated.PatchCoreClient.
        codec / max_chunk_bytes: how the coreset is encoded (the server's settings).
        global_bank_size: the most bank rows :meth:`evaluate` accepts (a larger bank stream is
            refused before it is decoded).
        test_dataset: images to score in :meth:`evaluate` (an AnomalyDataset with labels).

    Parameters are encoded wire messages, one uint8 array each (not a raw [n, D] float32
    coreset): what fedserver and the Flower ServerApp read, compressed by the codec.
    """

    def __init__(
        self,
        dataset: ImageSource,
        backbone: str | FeatureConfig = "wide_resnet50_2",
        *,
        site_id: str = "0",
        coreset_percentage: float = 0.1,
        seed: int = 0,
        device: str | None = None,
        batch_size: int = 8,
        codec: CodecConfig | None = None,
        max_chunk_bytes: int = 1 << 20,
        global_bank_size: int = 10000,
        test_dataset: Any = None,
    ) -> None:
        from core.codec import DEFAULT_CODEC

        self.client = PatchCoreClient(
            site_id, dataset, backbone, coreset_percentage, seed=seed, device=device,
            batch_size=batch_size,
        )
        self.dataset = dataset
        self.test_dataset = test_dataset
        self.codec = codec or DEFAULT_CODEC
        self.max_chunk_bytes = max_chunk_bytes
        self.global_bank_size = global_bank_size

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        """Return local coreset as parameters: its upload messages, one uint8 array each."""
        messages = site_upload(self.client, 1, self.codec, self.max_chunk_bytes)
        return [np.frombuffer(m, dtype=np.uint8) for m in messages]

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """Train local model (the coreset); ``parameters`` are not used in round 1."""
        self.client.train()
        metrics = {"coverage-radius": self.client.coverage_radius, "site-id": self.client.site_id}
        return self.get_parameters(config), len(self.dataset), metrics

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, Any]]:
        """Evaluate using global model: ``parameters`` are the bank's BankChunk messages.

        Returns (loss, number of images, metrics). The loss is 1 - image AUROC of the test set
        (0 is perfect), or, without a test set, the certified coverage radius r_S + max r_i
        the bank came with.
        """
        messages = [np.asarray(p, dtype=np.uint8).tobytes() for p in parameters]
        delivery = receive_bank(messages, max_rows=self.global_bank_size)
        self.client.update_global_bank(delivery.bank)
        certificate = delivery.server_radius + delivery.max_site_radius
        metrics: dict[str, Any] = {"bank-rows": int(delivery.bank.shape[0]),
                                   "certificate": certificate}
        if self.test_dataset is None:
            return float(certificate), len(self.dataset), metrics
        from core.evaluation import evaluate as evaluate_predictions

        predictions = self.client.predict(self.test_dataset)
        result = evaluate_predictions(
            predictions, self.test_dataset, self.client.feature_config.transform
        )
        auroc = result.as_dict()["image_auroc"]
        metrics["image-auroc"] = auroc
        return 1.0 - float(auroc), len(self.test_dataset), metrics
