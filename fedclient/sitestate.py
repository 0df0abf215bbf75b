"""What a site keeps between runs so that a later round reads only its new images.

A site that takes part in round 2 months after round 1 is a new ``fedclient run`` with the same
``--out`` folder. Its folder holds ``site-state.safetensors``, written after every round:

* the round-1 local coreset and its r_i, every row the site uploaded as the server decoded them,
  and the largest r_i it reported (core.federated.ClientState);
* the SHA-256 of every training image it fitted or covered, and of every image it held out for
  calibration, so the next run tells new images from known ones by content (a moved or renamed
  file is still known; a changed file is new);
* the site, federation and feature fingerprint it belongs to: a state of another federation or
  extractor is ignored (with a warning) and the site fits all its images again.

The images themselves and their features are never stored: the rows that were uploaded are all
a later round needs (core.federated.newdata).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from core.data import AnomalyDataset
from core.federated import ClientState

logger = logging.getLogger(__name__)

__all__ = ["STATE_FILE", "SiteState", "image_digests", "load_state", "save_state"]

STATE_FILE = "site-state.safetensors"
_FORMAT = 1


@dataclass(frozen=True)
class SiteState:
    """A site's state after a round (see the module doc).

    client: the PatchCoreClient's state. site_id / federation_id / fingerprint: whose it is.
    round: the last round it took part in. fitted / validation: SHA-256 hex digests of the
    images it fitted or covered, and of those it held out to calibrate on.
    """

    client: ClientState
    site_id: str
    federation_id: str
    fingerprint: str
    round: int
    fitted: frozenset[str]
    validation: frozenset[str]


def image_digests(dataset: AnomalyDataset) -> list[str]:
    """SHA-256 hex digest of each image file of ``dataset``, in its order (reads the files, not
    the pixels: seconds for thousands of images, against minutes of backbone)."""
    digests = []
    for sample in dataset:
        digest = hashlib.sha256()
        with open(sample.image_path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        digests.append(digest.hexdigest())
    return digests


def save_state(out_dir: Path, state: SiteState) -> Path:
    """Write ``out_dir/site-state.safetensors`` (atomically: a crash leaves the old one)."""
    from safetensors.numpy import save_file

    client = state.client
    meta = {
        "format": _FORMAT, "site_id": state.site_id, "federation_id": state.federation_id,
        "feature_fingerprint": state.fingerprint, "round": state.round,
        "coverage_radius": client.coverage_radius, "reported_radius": client.reported_radius,
        "num_images": client.num_images, "num_patches": client.num_patches,
        "fitted": sorted(state.fitted), "validation": sorted(state.validation),
    }
    path = out_dir / STATE_FILE
    partial = path.with_suffix(".partial")
    save_file(
        {"coreset": np.ascontiguousarray(client.coreset, dtype=np.float32),
         "uploaded": np.ascontiguousarray(client.uploaded, dtype=np.float32)},
        str(partial), metadata={"fedpatchcore_site_state": json.dumps(meta)},
    )
    partial.replace(path)
    return path


def load_state(out_dir: Path) -> SiteState | None:
    """The state an earlier run saved in ``out_dir``, or None (no file; or one that cannot be
    used: then one warning says why, and the site fits all its images again)."""
    path = out_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as file:
            meta = json.loads((file.metadata() or {})["fedpatchcore_site_state"])
            coreset, uploaded = file.get_tensor("coreset"), file.get_tensor("uploaded")
        if meta.get("format") != _FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, this fedclient reads {_FORMAT}")
        client = ClientState(
            coreset=coreset, coverage_radius=float(meta["coverage_radius"]),
            reported_radius=float(meta["reported_radius"]), uploaded=uploaded,
            num_images=int(meta["num_images"]), num_patches=int(meta["num_patches"]),
        )
        return SiteState(
            client, str(meta["site_id"]), str(meta["federation_id"]),
            str(meta["feature_fingerprint"]), int(meta["round"]),
            frozenset(meta["fitted"]), frozenset(meta["validation"]),
        )
    except (OSError, KeyError, ValueError, TypeError, SafetensorError) as error:
        logger.warning("%s cannot be read (%s): it is ignored and every image fitted again",
                       path, error)
        return None
