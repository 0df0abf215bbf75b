"""A site model file: the bank and everything a site needs to decide, in one safetensors file.

What it holds (no pickle; arrays as safetensors tensors, the rest as JSON metadata):

* tensors: ``memory_bank`` [K, D] float32 (in IVF cell order when the search is "ivf"),
  ``ivf_centroids`` [C, D] and ``ivf_offsets`` [C + 1] (the search structure, so loading builds
  nothing), ``validation_scores`` [n] (the calibration images' scores, for reports);
* metadata ``fedpatchcore``: what :meth:`core.patchcore.PatchCore.save` writes (feature config,
  extractor fingerprint with the weights' SHA-256): ``PatchCore.load`` reads a site model file
  as a plain bank, and loading refuses an extractor whose weights differ;
* metadata ``site_model``: ``format_version`` (:data:`FORMAT_VERSION`), the search
  (method, nprobe, cells), the :class:`~core.calibration.Calibration` (thresholds with what backs
  them, normalisation ranges, any "calibration uncertain" note) and ``provenance``: federation
  and bank version, round, site, server, coverage certificate, codec, extractor fingerprint,
  backbone, weights source and digest, creation time;
* metadata ``extra``: the provenance again, where tools that read bank files look for it.

:meth:`SiteModel.calibrate` scores validation images through the same :class:`Inferencer` (the
same search) that later decides, so the thresholds mean what the decisions use.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from core.calibration import (
    DEFAULT_PIXEL_TARGET_FPR,
    DEFAULT_TARGET_FPR,
    Calibration,
    calibrate,
)
from core.data import AnomalyDataset
from core.inference import Inferencer, SearchMethod
from core.ivf import IVFIndex, default_nprobe
from core.patchcore import ImageSource, ModelFileError, PatchCore, Predictions
from core.preprocess import ImageTransform

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "IVF_MIN_ROWS",
    "SITE_MODEL_FILE",
    "SearchSpec",
    "SiteModel",
    "is_site_model",
    "labels_and_masks",
    "provenance_of",
]

#: Version of the ``site_model`` record; loading refuses any other.
FORMAT_VERSION = 1
#: Default file name of a site model in a site's output folder.
SITE_MODEL_FILE = "site-model.safetensors"
#: ``search="auto"`` uses the IVF index on the CPU from this many bank rows (below it the exact
#: search is already a small part of an image's time).
IVF_MIN_ROWS = 4096


@dataclass(frozen=True)
class SearchSpec:
    """How the bank is searched: ``method`` "exact" or "ivf", ``nprobe`` cells per patch."""

    method: SearchMethod = "exact"
    nprobe: int = 8

    def __post_init__(self) -> None:
        if self.method not in ("exact", "ivf"):
            raise ValueError(f"search must be 'exact' or 'ivf', got {self.method!r}")
        if self.nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {self.nprobe}")

    @staticmethod
    def choose(method: str, rows: int, device: str, nprobe: int | None = None) -> SearchSpec:
        """Resolve "auto": IVF on the CPU from IVF_MIN_ROWS rows, exact otherwise (a GPU runs
        the exact search at a small share of the backbone's time). ``nprobe`` None:
        core.ivf.default_nprobe for ``rows``."""
        if method == "auto":
            method = "ivf" if rows >= IVF_MIN_ROWS and device == "cpu" else "exact"
        chosen = nprobe if nprobe is not None else default_nprobe(rows)
        return SearchSpec(method, chosen)  # type: ignore[arg-type]


def is_site_model(path: Path) -> bool:
    """Whether ``path`` holds a site model record (else it is a plain bank, or unreadable)."""
    try:
        with safe_open(str(path), framework="numpy") as handle:
            return "site_model" in (handle.metadata() or {})
    except (SafetensorError, OSError):
        return False


class SiteModel:
    """A PatchCore bank with its search, calibration and provenance.

    Build one with :meth:`from_model`, calibrate it with :meth:`calibrate`, write it with
    :meth:`save`, read it back with :meth:`load`; :meth:`inferencer` scores new images.
    """

    def __init__(
        self,
        model: PatchCore,
        *,
        search: SearchSpec,
        ivf: IVFIndex | None = None,
        calibration: Calibration | None = None,
        provenance: dict[str, object] | None = None,
        validation_scores: np.ndarray | None = None,
    ) -> None:
        if search.method == "ivf" and ivf is None:
            raise ValueError("an IVF search needs its index")
        self.model = model
        self.search = search
        self.ivf = ivf
        self.calibration = calibration
        self.provenance: dict[str, object] = dict(provenance or {})
        self.validation_scores = validation_scores
        self._inferencer: Inferencer | None = None

    @classmethod
    def from_model(
        cls,
        model: PatchCore,
        *,
        search: str = "auto",
        nprobe: int | None = None,
        provenance: dict[str, object] | None = None,
    ) -> SiteModel:
        """Wrap ``model`` (bank set); builds the IVF index when the search is (or resolves to)
        "ivf". The IVF index reorders nothing in ``model``: the saved bank is in cell order."""
        spec = SearchSpec.choose(search, model.memory_bank.shape[0], model.device.type, nprobe)
        ivf = (IVFIndex.build(model.memory_bank, seed=model.config.seed)
               if spec.method == "ivf" else None)
        return cls(model, search=spec, ivf=ivf, provenance=provenance)

    # -- properties ---------------------------------------------------------------------------

    @property
    def bank_version(self) -> int | None:
        version = self.provenance.get("bank_version")
        return int(version) if isinstance(version, int) else None  # type: ignore[arg-type]

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    def inferencer(self) -> Inferencer:
        """The warm scorer of this model (built once)."""
        if self._inferencer is None:
            self._inferencer = Inferencer(self.model, search=self.search.method, ivf=self.ivf,
                                          nprobe=self.search.nprobe)
        return self._inferencer

    # -- calibration --------------------------------------------------------------------------

    def calibrate(
        self,
        images: ImageSource,
        *,
        labels: np.ndarray | None = None,
        masks: np.ndarray | None = None,
        target_fpr: float = DEFAULT_TARGET_FPR,
        pixel_target_fpr: float = DEFAULT_PIXEL_TARGET_FPR,
        validation_share: float | None = None,
        seed: int | None = None,
        batch_size: int | None = None,
    ) -> Calibration:
        """Score ``images`` (validation images, good unless ``labels`` says otherwise) with this
        model's own search and set :attr:`calibration` from them (core.calibration.calibrate).

        masks: [n, H, W] bool ground truth at the maps' geometry, for an F1 pixel threshold.
        """
        predictions, _ = self.inferencer().predict(images, batch_size=batch_size)
        return self.calibrate_predictions(
            predictions, labels=labels, masks=masks, target_fpr=target_fpr,
            pixel_target_fpr=pixel_target_fpr, validation_share=validation_share, seed=seed,
        )

    def calibrate_predictions(
        self,
        predictions: Predictions,
        *,
        labels: np.ndarray | None = None,
        masks: np.ndarray | None = None,
        target_fpr: float = DEFAULT_TARGET_FPR,
        pixel_target_fpr: float = DEFAULT_PIXEL_TARGET_FPR,
        validation_share: float | None = None,
        seed: int | None = None,
    ) -> Calibration:
        """As :meth:`calibrate`, from predictions already made by :meth:`inferencer`."""
        self.calibration = calibrate(
            predictions.image_scores, predictions.anomaly_maps, labels=labels, masks=masks,
            target_fpr=target_fpr, pixel_target_fpr=pixel_target_fpr,
            validation_share=validation_share, seed=seed,
        )
        self.validation_scores = predictions.image_scores.astype(np.float32)
        return self.calibration

    # -- persistence --------------------------------------------------------------------------

    def record(self) -> dict[str, object]:
        """The ``site_model`` metadata record (JSON-friendly)."""
        return {
            "format_version": FORMAT_VERSION,
            "search": asdict(self.search),
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "provenance": self.provenance,
        }

    def save(self, path: str | Path) -> Path:
        """Write the site model file atomically (temp file + rename): a watcher reloading it
        never reads half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        provenance = {**self.provenance, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                    time.gmtime())}
        self.provenance = provenance
        tensors = {"memory_bank": self.model.memory_bank}
        if self.ivf is not None:
            tensors = {"memory_bank": np.ascontiguousarray(self.ivf.rows),
                       "ivf_centroids": self.ivf.centroids,
                       "ivf_offsets": self.ivf.offsets.astype(np.int64)}
        if self.validation_scores is not None:
            tensors["validation_scores"] = np.asarray(self.validation_scores, np.float32)
        metadata = {
            "fedpatchcore": json.dumps(self.model.metadata()),
            "site_model": json.dumps(self.record()),
            "extra": json.dumps(provenance),
        }
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)
        logger.info("wrote site model %s (bank v%s, %d rows, search %s%s)", path,
                    self.bank_version, self.model.memory_bank.shape[0], self.search.method,
                    ", calibrated" if self.calibration else ", NOT calibrated")
        return path

    @staticmethod
    def read_record(path: str | Path) -> dict[str, object]:
        """The ``site_model`` record of ``path`` (ModelFileError if there is none)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no site model file at {path}")
        try:
            with safe_open(str(path), framework="numpy") as handle:
                raw = (handle.metadata() or {}).get("site_model")
        except SafetensorError as exc:
            raise ModelFileError(f"{path} is not a readable model file: {exc}") from exc
        if raw is None:
            raise ModelFileError(f"{path} is a bank without a site model record (not calibrated)")
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ModelFileError(f"{path}: the site model record is not JSON: {exc}") from exc
        if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION:
            raise ModelFileError(
                f"{path}: unsupported site model format "
                f"{record.get('format_version') if isinstance(record, dict) else record!r}, "
                f"expected {FORMAT_VERSION}"
            )
        return record

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        pretrained: bool | None = None,
        weights: str | None = None,
        device: str | None = None,
    ) -> SiteModel:
        """Read a site model file, or a plain bank file (then uncalibrated, exact search).

        The backbone comes from ``weights`` / ``pretrained`` (default: pretrained iff the file
        says its bank was built with pretrained weights); loading raises
        core.patchcore.FeatureMismatchError when its weights differ from the bank's.
        """
        path = Path(path)
        extra = PatchCore.read_extra(path)
        if pretrained is None:
            pretrained = weights is not None or bool(extra.get("pretrained", False))
        model = PatchCore.load(path, pretrained=pretrained, weights=weights, device=device)
        if not is_site_model(path):
            return cls(model, search=SearchSpec("exact"), provenance=extra)
        record = cls.read_record(path)
        try:
            search = SearchSpec(**record["search"])  # type: ignore[arg-type]
            provenance = dict(record.get("provenance") or {})  # type: ignore[call-overload]
            raw_calibration = record.get("calibration")
            calibration = (Calibration.from_dict(raw_calibration)  # type: ignore[arg-type]
                           if raw_calibration is not None else None)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{path}: malformed site model record: {exc}") from exc
        with safe_open(str(path), framework="numpy") as handle:
            names = set(handle.keys())
            arrays = {name: handle.get_tensor(name) for name in
                      ("ivf_centroids", "ivf_offsets", "validation_scores") if name in names}
        ivf = None
        if search.method == "ivf":
            if "ivf_centroids" not in arrays or "ivf_offsets" not in arrays:
                raise ModelFileError(f"{path}: IVF search without its ivf_* tensors")
            bank = model.memory_bank
            try:
                ivf = IVFIndex(rows=bank, centroids=arrays["ivf_centroids"],
                               offsets=arrays["ivf_offsets"],
                               order=np.arange(bank.shape[0], dtype=np.int64))
            except ValueError as exc:
                raise ModelFileError(f"{path}: inconsistent IVF index: {exc}") from exc
        return cls(model, search=search, ivf=ivf, calibration=calibration,
                   provenance=provenance, validation_scores=arrays.get("validation_scores"))


def provenance_of(model: PatchCore, **federation: object) -> dict[str, object]:
    """A provenance record: the extractor's identity plus ``federation`` (bank_version, round,
    site_id, server, certificate, codec, ...; None values are dropped)."""
    fingerprint = model.extractor.fingerprint()
    features = model.config.features
    record: dict[str, object] = {
        "backbone": features.backbone,
        "feature_fingerprint": features.fingerprint(),
        "pretrained": features.pretrained or features.weights is not None,
        "weights_source": fingerprint["weights_source"],
        "weights_sha256": fingerprint["weights_sha256"],
        "bank_rows": int(model.memory_bank.shape[0]),
    }
    record.update({k: v for k, v in federation.items() if v is not None})
    return record


def labels_and_masks(
    dataset: AnomalyDataset, transform: ImageTransform
) -> tuple[np.ndarray, np.ndarray | None]:
    """Image labels [n] and ground-truth masks [n, H, W] bool at the model's geometry of a
    labelled dataset (masks None when no image has a mask file)."""
    labels = dataset.labels
    if not any(sample.mask_paths for sample in dataset):
        return labels, None
    masks: list[np.ndarray | None] = [
        transform.mask(dataset.load_mask(i)) if dataset[i].mask_paths else None
        for i in range(len(dataset))
    ]
    shape = next(m.shape for m in masks if m is not None)
    return labels, np.stack([m if m is not None else np.zeros(shape, bool) for m in masks])
