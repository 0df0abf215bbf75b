"""Every setting of a site (``fedclient run | score | calibrate | inspect | status | check``),
documented once.

:class:`SiteSettings` lists the keys a site configuration file (``--config site.toml``) may
hold: the long flag names with ``_``. Each field's ``help`` says what it does and its default is
the one the commands use; ``fedclient init-config`` writes them all, commented, from here.
Precedence: flag > environment variable ``FEDCLIENT_<SETTING>`` (``FEDCLIENT_SERVER``,
``FEDCLIENT_SITE_ID``, ...; ``FEDCLIENT_CONFIG`` names the file) > TOML file > default.
A command ignores the settings it has no use for (``status`` ignores ``data``), so one file
serves every command.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from core.settings import toml_example

logger = logging.getLogger(__name__)

__all__ = ["CONFIG_ENV", "ENV_PREFIX", "SiteSettings", "defaults", "example_config"]

ENV_PREFIX: Final[str] = "FEDCLIENT"
CONFIG_ENV: Final[str] = "FEDCLIENT_CONFIG"


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class SiteSettings:
    """The settings of one site; see the module docstring. None = not set (no default)."""

    server: str | None = field(default=None, metadata=_help(
        "HOST:PORT of fedserver (run, status, check)."))
    site_id: str | None = field(default=None, metadata=_help(
        "This site's id; the token must belong to it."))
    token_file: Path | None = field(default=None, metadata=_help(
        "File holding this site's bearer token (from the server's operator; keep it private)."))
    tls_ca: Path | None = field(default=None, metadata=_help(
        "PEM CA of the server certificate; enables TLS (else plaintext: loopback only)."))
    tls_cert: Path | None = field(default=None, metadata=_help(
        "PEM certificate of this site, for mutual TLS (with tls_key)."))
    tls_key: Path | None = field(default=None, metadata=_help(
        "PEM private key of tls_cert."))
    tls_server_name: str | None = field(default=None, metadata=_help(
        "Name to check in the server certificate (default: the host of `server`)."))
    timeout: float = field(default=60.0, metadata=_help(
        "Deadline of each call and upload stream, seconds."))
    retries: int = field(default=6, metadata=_help(
        "Attempts per call or upload, the first included (bounded exponential backoff)."))
    max_message_mb: int = field(default=16, metadata=_help(
        "gRPC max send/receive message size, MiB."))
    data: Path | None = field(default=None, metadata=_help(
        "The site's images: an AutoVI / MVTec layout folder, or a plain folder of good images."))
    categories: tuple[str, ...] = field(default=(), metadata=_help(
        "Only these object/category folders of `data` (empty: all)."))
    out: Path | None = field(default=None, metadata=_help(
        "Output folder (bank.safetensors, metrics.json, overlays/); unset: fedclient-out for\n"
        "run, fedclient-score for score."))
    bank: Path | None = field(default=None, metadata=_help(
        "Bank file `score` uses (unset: fedclient-out/bank.safetensors)."))
    device: Literal["cpu", "cuda"] | None = field(default=None, metadata=_help(
        "Where features are computed: \"cpu\" or \"cuda\" (unset: CUDA when available)."))
    weights: Path | None = field(default=None, metadata=_help(
        "Local backbone weights (.safetensors / .pth) for a pretrained extractor without network."))
    no_overlays: bool = field(default=False, metadata=_help(
        "Do not write anomaly-map overlay PNGs."))
    backbone: str | None = field(default=None, metadata=_help(
        "timm backbone when the server pins no extractor (unset: wide_resnet50_2)."))
    pretrained: bool | None = field(default=None, metadata=_help(
        "Pretrained weights through timm when the server pins no extractor (unset: true).\n"
        "Random weights (false) are for tests only; a warning says so."))
    image_size: int | None = field(default=None, metadata=_help(
        "Resize side in px, no crop, when the server pins no extractor (unset: resize 256,\n"
        "crop 224)."))
    target_dim: int | None = field(default=None, metadata=_help(
        "Feature dimension D when the server pins no extractor (unset: 1024)."))
    coreset_percentage: float | None = field(default=None, metadata=_help(
        "Local coreset (the round-1 upload) as a fixed fraction of the site's patches\n"
        "(unset: sized from the server's k, see upload_factor)."))
    upload_factor: float = field(default=2.0, metadata=_help(
        "Unless coreset_percentage is set, the site uploads min(its patches,\n"
        "upload_factor x k / S) rows (k: the server's global bank, S: its expected sites)."))
    seed: int = field(default=0, metadata=_help(
        "Seed of the projection and start points."))
    batch_size: int = field(default=8, metadata=_help(
        "Images per backbone pass."))
    max_rounds: int | None = field(default=None, metadata=_help(
        "Stop after this many rounds (unset: every round the server opens)."))
    round_timeout: float = field(default=3600.0, metadata=_help(
        "Longest wait for a round's bank after uploading, seconds."))
    max_upload_rate: float | None = field(default=None, metadata=_help(
        "Throttle uploads to this many bytes/s (unset: unlimited)."))
    # --- decisions (docs/inspection.md) ---
    model: Path | None = field(default=None, metadata=_help(
        "Site model file `score` and `inspect` decide with (unset: fedclient-out/\n"
        "site-model.safetensors when it exists, else `bank`); `calibrate` calibrates it."))
    validation_share: float = field(default=0.15, metadata=_help(
        "Share of the training images `run` holds back from the coreset (seeded by `seed`)\n"
        "to calibrate the decision thresholds on; 0: no calibration, no decisions."))
    target_fpr: float = field(default=0.01, metadata=_help(
        "False-positive rate the image threshold aims at (good images flagged anomalous)."))
    pixel_target_fpr: float = field(default=0.01, metadata=_help(
        "Share of good pixels the defect masks may flag (the pixel threshold's target)."))
    knn: Literal["auto", "exact", "ivf"] = field(default="auto", metadata=_help(
        "Bank search of the site model: \"exact\", \"ivf\" (k-means cells, for large banks\n"
        "on a CPU) or \"auto\" (ivf on a CPU from 4,096 bank rows)."))
    watch: str | None = field(default=None, metadata=_help(
        "Folder `inspect` watches for new images, or \"-\" to read image paths from stdin."))
    include_existing: bool = field(default=False, metadata=_help(
        "`inspect` also scores the images already in the watched folder at start."))
    max_images: int | None = field(default=None, metadata=_help(
        "`inspect` stops after this many images (unset: runs until interrupted)."))
    settle: float = field(default=0.2, metadata=_help(
        "Seconds a new file must be quiet before `inspect` reads it (a close is enough)."))
    read_retries: int = field(default=3, metadata=_help(
        "Times `inspect` retries a file it cannot read (half written?) before skipping it."))


#: TOML literals for the settings without a default (written commented out).
_EXAMPLES: Final[dict[str, str]] = {
    "server": '"127.0.0.1:50051"',
    "site_id": '"plant-1"',
    "token_file": '"plant-1.token"',
    "tls_ca": '"ca.pem"',
    "tls_cert": '"site.pem"',
    "tls_key": '"site.key"',
    "tls_server_name": '"fedserver.example.com"',
    "data": '"data"',
    "out": '"fedclient-out"',
    "bank": '"fedclient-out/bank.safetensors"',
    "device": '"cuda"',
    "weights": '"/models/wide_resnet50_2.safetensors"',
    "backbone": '"wide_resnet50_2"',
    "pretrained": "true",
    "image_size": "256",
    "target_dim": "1024",
    "max_rounds": "1",
    "coreset_percentage": "0.1",
    "max_upload_rate": "5000000.0",
    "model": '"fedclient-out/site-model.safetensors"',
    "watch": '"/data/incoming"',
    "max_images": "1000",
}

_HEADER: Final[str] = """\
fedclient site configuration: fedclient run --config THIS_FILE (also score, inspect, status...)
Every setting below, with what it does and its default; keys are the long flag names with '_'.
Relative paths are relative to this file. Precedence: command-line flag > environment
variable (FEDCLIENT_SITE_ID=plant-1; FEDCLIENT_CONFIG names this file) > this file > default."""


def defaults() -> dict[str, object]:
    """{setting: default} for every setting that has one (None-valued ones are left out)."""
    return {
        f.name: f.default for f in dataclasses.fields(SiteSettings)
        if f.default is not None and f.default != ()
    }


def example_config(values: dict[str, object] | None = None) -> str:
    """The commented TOML ``fedclient init-config`` writes (``values`` fill in settings)."""
    return toml_example(SiteSettings, values or {}, header=_HEADER, examples=_EXAMPLES)
