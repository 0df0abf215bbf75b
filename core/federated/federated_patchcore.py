"""High-level federated PatchCore: clients + server + rounds behind one object."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.codec import DEFAULT_CODEC, CodecConfig
from core.features import FeatureConfig
from core.federated.aggregator import ServerSelection, Strategy
from core.federated.client import PatchCoreClient
from core.federated.server import FederatedServer, RoundReport
from core.federated.upload import UPLOAD_FACTOR, UploadBudget
from core.knn import Backend
from core.patchcore import ImageSource, PatchCore, PatchCoreConfig, Predictions

logger = logging.getLogger(__name__)

__all__ = ["UPLOAD_FACTOR", "FederatedPatchCore"]


class FederatedPatchCore:
    """High-level federated PatchCore trainer.

    Args:
        num_clients: number of federated clients.
        backbone: feature extractor backbone (timm name), or a full FeatureConfig.
        global_bank_size: target global memory bank size.
        coreset_percentage: each client's local coreset (its upload), as a fraction of its
            patches. None (default): sized by the rule ``fedclient`` follows
            (core.federated.upload.UploadBudget): each site sends min(its patches,
            ceil(upload_factor x global_bank_size / num_clients)) rows, so the sites together
            send about upload_factor x the bank and the server has a choice
            (docs/python-api.md, "How much each site sends").
        upload_factor: f of that rule (default ``UPLOAD_FACTOR``); unused with a
            coreset_percentage.
        aggregation_strategy: "coreset" or "random" (see FederatedServer).
        weighted: see FederatedServer.
        codec: wire codec (default fp16 + shuffle + zstd).
        seed: seeds every selection (the same on all sites).
        device: "cpu", "cuda", or None for CUDA when available.
        batch_size: images per backbone pass.
        num_neighbors: image-score reweighting (1 = max patch score).
        knn_backend: nearest-neighbour backend of the global model.
        server_selection: how the coreset strategy picks the bank from the uploads (see
            FederatedServer).
        floor_fraction: prefix selection: each site's guaranteed fraction of its proportional
            share of the bank (None: the default; see FederatedServer).
        max_site_share: prefix selection: most rows one site may keep, fraction of k (None:
            no cap).

    Example::

        fed_model = FederatedPatchCore(num_clients=5)
        fed_model.setup_clients(client_datasets)
        fed_model.train()
        anomaly_maps = fed_model.predict(test_dataset).anomaly_maps
    """

    def __init__(
        self,
        num_clients: int = 5,
        backbone: str | FeatureConfig = "wide_resnet50_2",
        global_bank_size: int = 10000,
        *,
        coreset_percentage: float | None = None,
        upload_factor: float = UPLOAD_FACTOR,
        aggregation_strategy: Strategy = "coreset",
        weighted: bool = True,
        codec: CodecConfig = DEFAULT_CODEC,
        seed: int = 0,
        device: str | None = None,
        batch_size: int = 8,
        num_neighbors: int = 1,
        knn_backend: Backend = "auto",
        server_selection: ServerSelection = "prefix",
        floor_fraction: float | None = None,
        max_site_share: float | None = None,
    ) -> None:
        self.num_clients = num_clients
        self.feature_config = (
            backbone if isinstance(backbone, FeatureConfig) else FeatureConfig(backbone)
        )
        if coreset_percentage is not None and not 0.0 < coreset_percentage <= 1.0:
            raise ValueError(f"coreset_percentage must be in (0, 1] or None, got "
                             f"{coreset_percentage}")
        self.global_bank_size = global_bank_size
        #: The fixed local fraction (None: every site's upload is sized by ``upload_budget``).
        self.coreset_percentage = coreset_percentage
        #: The upload rule in use, None with a fixed coreset_percentage.
        self.upload_budget = (
            UploadBudget(global_bank_size, num_clients, factor=upload_factor)
            if coreset_percentage is None else None
        )
        self.seed = seed
        self.device = device
        self.batch_size = batch_size
        self.server = FederatedServer(
            num_clients,
            global_bank_size,
            aggregation_strategy,
            weighted,
            codec=codec,
            seed=seed,
            device=device,
            server_selection=server_selection,
            floor_fraction=floor_fraction,
            max_site_share=max_site_share,
        )
        self.clients: list[PatchCoreClient] = []
        #: The federation record read by :meth:`load` (None for a model trained here).
        self.saved_federation: dict[str, object] | None = None
        self.global_model = PatchCore(
            PatchCoreConfig(
                features=self.feature_config,
                seed=seed,
                device=device,
                batch_size=batch_size,
                num_neighbors=num_neighbors,
                knn_backend=knn_backend,
            )
        )

    @property
    def reports(self) -> list[RoundReport]:
        """One report per round trained so far (bytes, radii, certificate)."""
        return self.server.reports

    def setup_clients(self, client_datasets: Sequence[ImageSource]) -> None:
        """Initialize clients with their data partitions (one dataset per client)."""
        if len(client_datasets) != self.num_clients:
            raise ValueError(
                f"expected {self.num_clients} client datasets, got {len(client_datasets)}"
            )
        if self.upload_budget is not None:
            logger.info(
                "local coresets: min(site patches, %d) rows each (%g x a global bank of %d over "
                "%d sites)", self.upload_budget.share, self.upload_budget.factor,
                self.global_bank_size, self.num_clients,
            )
        self.clients = [
            PatchCoreClient(
                i,
                dataset,
                self.feature_config,
                self.coreset_percentage,
                upload_budget=self.upload_budget,
                seed=self.seed,
                device=self.device,
                batch_size=self.batch_size,
                num_neighbors=self.global_model.config.num_neighbors,
            )
            for i, dataset in enumerate(client_datasets)
        ]

    def train(self, num_rounds: int = 1) -> FederatedPatchCore:
        """Execute federated training.

        Args:
            num_rounds: number of communication rounds. PatchCore needs only 1; later rounds
                upload only patches the bank covers worse than its coverage radius.

        Returns:
            self
        """
        if not self.clients:
            raise RuntimeError("no clients: call setup_clients(client_datasets) first")
        if num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {num_rounds}")
        for _ in range(num_rounds):
            bank = self.server.train_round(self.clients)
            self.global_model.set_memory_bank(bank)
            last = self.reports[-1]
            self.global_model.coverage_radius = last.certificate
        self.global_model.num_training_images = sum(c.data_size for c in self.clients)
        self.global_model.num_training_patches = sum(
            c.model.num_training_patches for c in self.clients
        )
        return self

    @property
    def global_bank(self) -> np.ndarray:
        return self.global_model.memory_bank

    def predict(self, dataset: ImageSource) -> Predictions:
        """Generate anomaly maps (and image scores) using the global model."""
        return self.global_model.predict(dataset)

    def save(self, path: str | Path) -> Path:
        """Save federated model: the global bank, its feature config and the round reports.

        The record's ``global_bank_size`` is the bank's real row count; ``requested_bank_size``
        is what was asked for (larger when the sites uploaded fewer rows than that).
        """
        return self.global_model.save(
            path,
            extra={
                "federation": {
                    "num_clients": self.num_clients,
                    "global_bank_size": int(self.global_bank.shape[0]),
                    "requested_bank_size": self.global_bank_size,
                    "coreset_percentage": self.coreset_percentage,
                    "upload_factor": (None if self.upload_budget is None
                                      else self.upload_budget.factor),
                    "aggregation_strategy": self.server.aggregation_strategy,
                    "codec": self.server.codec.value_type,
                    "rounds": [r.as_dict() for r in self.reports],
                }
            },
        )

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        pretrained: bool = True,
        weights: str | None = None,
        device: str | None = None,
    ) -> FederatedPatchCore:
        """Load what :meth:`save` wrote: a FederatedPatchCore whose ``predict`` scores with the
        saved global bank. The backbone weights are not in the file: ``pretrained`` / ``weights``
        say where they come from. The saved round reports are in ``saved_federation``.
        """
        model = PatchCore.load(path, pretrained=pretrained, weights=weights, device=device)
        federation = PatchCore.read_extra(path).get("federation")
        if not isinstance(federation, dict):
            raise ValueError(f"{path} holds a PatchCore model but no federation record")
        loaded = cls(
            num_clients=int(federation["num_clients"]),
            backbone=model.config.features,
            global_bank_size=int(
                federation["requested_bank_size"]
                if "requested_bank_size" in federation
                else federation["global_bank_size"]
            ),
            coreset_percentage=(None if federation["coreset_percentage"] is None
                                else float(federation["coreset_percentage"])),
            upload_factor=float(federation.get("upload_factor") or UPLOAD_FACTOR),
            aggregation_strategy=federation["aggregation_strategy"],
            seed=model.config.seed,
            device=device,
            num_neighbors=model.config.num_neighbors,
        )
        loaded.global_model = model
        loaded.saved_federation = federation
        return loaded
