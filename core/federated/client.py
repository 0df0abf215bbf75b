"""A federated site: local features and coreset, uploads, and scoring with the global bank.

Images never leave the client. What leaves it is (a) in round 1 its local coreset and (b) in
later rounds only its *novel* patches: training patches farther from the current global bank
than the server's coverage radius, i.e. the patches the bank covers worst.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from core.codec import CodecConfig
from core.coreset import IncrementalCoreset
from core.features import FeatureConfig
from core.federated.upload import UploadBudget
from core.knn import NearestNeighbourIndex
from core.messages import FeatureChunk, SiteSummary
from core.patchcore import ImageSource, PatchCore, PatchCoreConfig, Predictions
from core.serde import DEFAULT_MAX_CHUNK_BYTES, codec_error, split_into_chunks

logger = logging.getLogger(__name__)

__all__ = ["NovelUpload", "PatchCoreClient"]


@dataclass(frozen=True)
class NovelUpload:
    """What a client sends in a round after the first.

    Attributes:
        features: [m, D] novel rows (m may be 0), a farthest-first selection among the site's
            training patches whose distance to the global bank exceeds ``threshold``.
        threshold: the distance that made a patch novel (the server's coverage radius).
        num_novel: how many training patches exceeded it (>= m).
        max_distance: the largest distance of any training patch to the global bank before this
            upload: the site's realised coverage radius under the bank it was sent.
    """

    features: np.ndarray
    threshold: float
    num_novel: int
    max_distance: float


class PatchCoreClient:
    """Federated learning client for PatchCore.

    Args:
        client_id: unique client identifier (an int as in the spec, or a site name).
        dataset: the site's training images (anything with ``len`` and ``load_image(i)``;
            normally a :class:`~core.data.AnomalyDataset` of good images).
        backbone: timm backbone name, shared by all clients; or a full
            :class:`~core.features.FeatureConfig` (layers, dims, weights file, image size).
        coreset_percentage: local coreset size as a fraction of the site's training patches
            (None: sized by ``upload_budget``).
        upload_budget: size the local coreset (the round-1 upload) from the round's k, the
            number of sites and the site's patch count (core.federated.upload.UploadBudget)
            instead of a fixed fraction; give it with ``coreset_percentage=None``.
        seed: seeds projection and coreset start points (use the same on every site).
        device: "cpu", "cuda", or None for CUDA when available.
        batch_size: images per backbone pass.
        num_neighbors: image-score reweighting of the site's scorer (see PatchCoreConfig).

    Example::

        client = PatchCoreClient(0, local_dataset)
        local_coreset = client.train()
        client.update_global_bank(global_features)
    """

    def __init__(
        self,
        client_id: int | str,
        dataset: ImageSource,
        backbone: str | FeatureConfig = "wide_resnet50_2",
        coreset_percentage: float | None = 0.1,
        *,
        upload_budget: UploadBudget | None = None,
        seed: int = 0,
        device: str | None = None,
        batch_size: int = 8,
        num_neighbors: int = 1,
    ) -> None:
        if len(dataset) == 0:
            raise ValueError(f"client {client_id!r}: dataset is empty")
        if (coreset_percentage is None) == (upload_budget is None):
            raise ValueError(
                f"client {client_id!r}: give exactly one of coreset_percentage and "
                f"upload_budget (got {coreset_percentage!r} and {upload_budget!r})"
            )
        features = backbone if isinstance(backbone, FeatureConfig) else FeatureConfig(backbone)
        self.client_id = client_id
        #: How the local coreset is sized: None when a fixed coreset_percentage does it.
        self.upload_budget = upload_budget
        self.dataset = dataset
        self.model = PatchCore(
            PatchCoreConfig(
                features=features,
                coreset_ratio=1.0 if coreset_percentage is None else coreset_percentage,
                seed=seed,
                device=device,
                batch_size=batch_size,
                num_neighbors=num_neighbors,
            )
        )
        self._coreset: np.ndarray | None = None
        self._uploaded: list[np.ndarray] = []
        self._codec_error: dict[tuple[CodecConfig, int], float] = {}
        self._fingerprint: str | None = None
        self.global_bank: np.ndarray | None = None

    @property
    def site_id(self) -> str:
        """The client id as it travels on the wire."""
        return str(self.client_id)

    @property
    def data_size(self) -> int:
        """Local dataset size (number of training images)."""
        return len(self.dataset)

    @property
    def feature_config(self) -> FeatureConfig:
        return self.model.config.features

    @property
    def coverage_radius(self) -> float:
        """r_i: every local training patch lies within this distance of the local coreset
        (float32 rows, before any codec; see :meth:`decoded_coverage_radius`)."""
        if self.model.coverage_radius is None:
            raise RuntimeError(f"client {self.client_id!r} has not trained yet")
        return self.model.coverage_radius

    def decoded_coverage_radius(
        self, codec: CodecConfig, *, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
    ) -> float:
        """r_i for the coreset as the server decodes it under ``codec``: what the site reports.

        The server selects from decoded rows, so the certificate needs every training patch
        within r_i of the *decoded* coreset. Each decoded row lies within e of its float32
        original (e: the largest row error of this coreset's chunks under ``codec``), so
        r_i + e bounds it (triangle inequality); e = 0 for the lossless codec. Re-measuring
        against the decoded rows exactly would cost a second pass of the backbone over every
        training image.
        """
        if self._coreset is None:
            raise RuntimeError(f"client {self.client_id!r} has not trained yet: call train()")
        key = (codec, max_chunk_bytes)
        if key not in self._codec_error:
            self._codec_error[key] = codec_error(
                self._coreset, config=codec, max_chunk_bytes=max_chunk_bytes
            )
        return self.coverage_radius + self._codec_error[key]

    def train(self) -> np.ndarray:
        """Extract features and build the local coreset ([k_i, D] float32)."""
        if self.upload_budget is None:
            self.model.fit(self.dataset)
        else:
            self.model.fit(self.dataset, bank_size=self.upload_budget.rows)
        self._coreset = self.model.memory_bank.copy()
        self._codec_error.clear()
        logger.info(
            "client %s: %d images, %d patches -> coreset %d rows (r_i = %.4f)",
            self.client_id, self.data_size, self.model.num_training_patches,
            self._coreset.shape[0], self.coverage_radius,
        )
        return self._coreset.copy()

    def get_coreset(self) -> np.ndarray:
        """Return current local coreset."""
        if self._coreset is None:
            raise RuntimeError(f"client {self.client_id!r} has not trained yet: call train()")
        return self._coreset.copy()

    def update_global_bank(self, global_features: np.ndarray) -> None:
        """Score with the aggregated global memory bank from now on."""
        self.model.set_memory_bank(global_features)
        self.global_bank = self.model.memory_bank

    def predict(self, dataset: ImageSource) -> Predictions:
        """Image scores and anomaly maps of ``dataset`` with the current bank (global once
        received, else the local coreset)."""
        return self.model.predict(dataset)

    # -- federation plumbing ---------------------------------------------------------------

    def encode_upload(
        self,
        round_number: int,
        rows: np.ndarray,
        codec: CodecConfig,
        *,
        max_chunk_bytes: int,
    ) -> tuple[SiteSummary, list[FeatureChunk]]:
        """This site's upload of ``round_number``: its SiteSummary and the chunks of ``rows``
        [n, D], both for ``codec`` cut at ``max_chunk_bytes`` (the server's
        RoundConfig.max_chunk_bytes), so the summary's r_i includes the round-trip error of
        exactly the chunks that are sent."""
        summary = self.summary(round_number, rows.shape[0], codec,
                               max_chunk_bytes=max_chunk_bytes)
        chunks = list(split_into_chunks(rows, config=codec, site_id=self.site_id,
                                        round=round_number, max_chunk_bytes=max_chunk_bytes))
        return summary, chunks

    def record_upload(self, rows: np.ndarray) -> None:
        """Remember rows this site sent, as the server decoded them (their realised coverage
        is reported per round)."""
        self._uploaded.append(np.asarray(rows, dtype=np.float32))

    def uploaded_radius(self, bank: np.ndarray) -> float:
        """Largest distance from any row this site ever uploaded to ``bank`` (Euclidean)."""
        if not self._uploaded:
            return 0.0
        rows = np.concatenate(self._uploaded)
        if rows.shape[0] == 0:
            return 0.0
        distances, _ = NearestNeighbourIndex(bank, backend=self.model.config.knn_backend).search(
            rows, 1
        )
        return float(distances.max())

    def novel_features(self, global_bank: np.ndarray, threshold: float) -> NovelUpload:
        """Patches the global bank covers worse than ``threshold`` (one pass over the images).

        Patches farther than ``threshold`` from the bank are streamed into a farthest-first
        selector with the local coreset's size as budget, so the upload is the most spread-out
        novel patches and memory stays bounded.
        """
        if self._coreset is None:
            raise RuntimeError(f"client {self.client_id!r} has not trained yet: call train()")
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        index = NearestNeighbourIndex(global_bank, backend=self.model.config.knn_backend)
        selector = IncrementalCoreset(
            self._coreset.shape[0],
            projection_dim=self.model.config.projection_dim,
            seed=self.model.config.seed,
        )
        num_novel = 0
        max_distance = 0.0
        for _, features, _ in self.model.iter_features(
            self.dataset, desc=f"site {self.client_id}: novel patches"
        ):
            flat = features.reshape(-1, features.shape[-1]).numpy()
            distances, _ = index.search(flat, 1)
            distances = distances[:, 0]
            max_distance = max(max_distance, float(distances.max()))
            novel = flat[distances > threshold]
            num_novel += novel.shape[0]
            if novel.shape[0]:
                selector.add(novel)
        rows = (
            selector.select().features
            if num_novel
            else np.empty((0, global_bank.shape[1]), dtype=np.float32)
        )
        logger.info(
            "client %s: %d novel patches beyond %.4f (max %.4f) -> upload %d rows",
            self.client_id, num_novel, threshold, max_distance, rows.shape[0],
        )
        return NovelUpload(rows, threshold, num_novel, max_distance)

    def summary(
        self,
        round_number: int,
        rows: int,
        codec: CodecConfig,
        *,
        max_chunk_bytes: int,
    ) -> SiteSummary:
        """The SiteSummary message that precedes this site's chunks in ``round_number``.

        Its coverage radius is :meth:`decoded_coverage_radius` for the codec and chunk size
        the chunks are sent with: the radius of the rows the server will actually hold.
        ``max_chunk_bytes`` has no default on purpose: int8/int4 quantise per chunk, so r_i
        measured with one chunking (1 MiB) does not hold for chunks cut with another (the
        server's RoundConfig.max_chunk_bytes, up to 3 MiB). :meth:`encode_upload` makes the
        summary and the chunks from one value.
        """
        config = self.feature_config
        if self._fingerprint is None:
            self._fingerprint = config.fingerprint()
        return SiteSummary(
            site_id=self.site_id,
            round=round_number,
            num_images=self.data_size,
            num_patches=max(self.model.num_training_patches, rows),
            coreset_rows=rows,
            coverage_radius=self.decoded_coverage_radius(codec, max_chunk_bytes=max_chunk_bytes),
            feature_dim=config.target_embed_dim,
            backbone=config.backbone,
            layers=config.layers,
            codec=codec,
            feature_fingerprint=self._fingerprint,
        )
