"""``fedclient``: the site command line (``fedclient run | score | calibrate | inspect | status |
check | init-config``).

Settings come from flags, ``FEDCLIENT_<SETTING>`` environment variables and a TOML file
(``--config site.toml``) whose keys are the long flag names with ``_``; precedence flag >
environment > file > default (fedclient.config). ``fedclient init-config`` writes a commented
example with every setting.
Failures a user can fix (server unreachable, token refused, round closed, extractor mismatch,
unusable data or settings) print one line ``fedclient: error: ...`` and exit with status 2
(1 for a run that failed on the server's side); ``--verbose`` adds the log.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import grpc

from core.data import DatasetError
from core.features import FeatureConfig, WeightsUnavailableError
from core.federated.upload import short_bank_note
from core.preprocess import ImageTransform
from core.settings import SettingsError, env_overrides
from fedclient.config import CONFIG_ENV, ENV_PREFIX, SiteSettings, defaults, example_config
from fedclient.session import (
    ConnectionConfig,
    RetryPolicy,
    SessionError,
    SiteSession,
    TLSConfig,
    read_token_file,
)
from fedpatchcore.v1 import federation_pb2 as fpb

logger = logging.getLogger(__name__)

__all__ = ["build_parser", "main"]

_STATES: Final[dict[int, str]] = {
    fpb.ROUND_STATE_COLLECTING: "collecting",
    fpb.ROUND_STATE_SELECTING: "selecting",
    fpb.ROUND_STATE_READY: "ready",
    fpb.ROUND_STATE_FAILED: "failed",
}


_SETTINGS: Final[frozenset[str]] = frozenset(f.name for f in dataclasses.fields(SiteSettings))
_PATH_KEYS: Final[frozenset[str]] = frozenset(
    {"token_file", "data", "out", "tls_ca", "tls_cert", "tls_key", "weights", "bank", "model",
     "watch"}
)


class UsageError(ValueError):
    """A setting is missing or unusable (the message names it)."""


# --- parser ------------------------------------------------------------------------------------


def _connection_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server connection")
    group.add_argument("--config", type=Path, help="TOML file of settings (default: "
                       "$FEDCLIENT_CONFIG); FEDCLIENT_<SETTING> variables override it, flags "
                       "override both")
    group.add_argument("--server", help="fedserver address HOST:PORT")
    group.add_argument("--site-id", help="this site's id; the token must belong to it")
    group.add_argument("--token-file", type=Path, help="file holding the site's bearer token")
    group.add_argument("--tls-ca", type=Path,
                       help="PEM CA of the server certificate; enables TLS (else plaintext)")
    group.add_argument("--tls-cert", type=Path, help="PEM site certificate, for mutual TLS")
    group.add_argument("--tls-key", type=Path, help="PEM site private key, for mutual TLS")
    group.add_argument("--tls-server-name",
                       help="name to check in the server certificate (default: the host)")
    group.add_argument("--timeout", type=float,
                       help="deadline of each call and upload stream, seconds (default 60)")
    group.add_argument("--retries", type=int,
                       help="attempts per call or upload, the first included (default 6)")
    group.add_argument("--max-message-mb", type=int,
                       help="gRPC max send/receive message size, MiB (default 16)")
    group.add_argument("-v", "--verbose", action="count", default=0,
                       help="log progress (-v) or everything (-vv) to stderr")


def _data_args(parser: argparse.ArgumentParser, *, out_help: str) -> None:
    parser.add_argument("--data", type=Path, help="the site's images: AutoVI / MVTec layout "
                        "folder, or a plain folder of normal images")
    parser.add_argument("--categories", nargs="+",
                        help="only these object/category folders of --data")
    parser.add_argument("--out", type=Path, help=out_help)
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="where features are computed (default: CUDA when available)")
    parser.add_argument("--weights", help="local backbone weights file (.safetensors/.pth) for a "
                        "pretrained extractor on a site without network")
    parser.add_argument("--no-overlays", action="store_true",
                        help="do not write anomaly-map overlay PNGs")


def _calibration_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("calibration (docs/inspection.md)")
    group.add_argument("--target-fpr", type=float,
                       help="false-positive rate the image threshold aims at (default 0.01)")
    group.add_argument("--pixel-target-fpr", type=float,
                       help="share of good pixels a defect mask may flag (default 0.01)")
    group.add_argument("--knn", choices=("auto", "exact", "ivf"),
                       help="bank search: exact, ivf (k-means cells) or auto (ivf on a CPU "
                       "from 4,096 bank rows; default)")


def _model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path,
                        help="site model file (default: fedclient-out/site-model.safetensors, "
                        "else fedclient-out/bank.safetensors)")


def _extractor_args(parser: argparse.ArgumentParser, *, weights: bool = False) -> None:
    local = parser.add_argument_group(
        "feature extractor (used only when the server pins none; all sites must agree). Its "
        "weights are checked before the site contacts the server"
    )
    local.add_argument("--backbone", help="timm backbone (default wide_resnet50_2)")
    local.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                       help="pretrained weights through timm, from its cache or downloaded "
                       "(default yes); --no-pretrained: random weights, for tests only")
    if weights:
        local.add_argument("--weights", help="local backbone weights file (.safetensors/.pth) "
                           "for a pretrained extractor on a site without network")
    local.add_argument("--image-size", type=int,
                       help="resize side in px, no crop (default: resize 256, crop 224)")
    local.add_argument("--target-dim", type=int, help="feature dimension D (default 1024)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedclient",
        description="FedPatchCore site client: fit this site's PatchCore coreset, take part in "
        "the federation's rounds, download the global bank and score the site's images. "
        "Settings: flag > environment variable FEDCLIENT_<SETTING> (FEDCLIENT_SERVER, "
        "FEDCLIENT_SITE_ID, FEDCLIENT_TOKEN_FILE, ...; FEDCLIENT_CONFIG names the TOML file) > "
        "TOML file (--config; `fedclient init-config` writes a commented one) > default.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="fit, upload, download the global bank, score; writes --out",
        description="Fit the local coreset, join the open round, upload (resuming after a "
        "disconnect from the server's committed position), wait for the global bank, download "
        "it (only the change when --out holds an older version), score the test images and "
        "write metrics.json, report.html, overlays/ and bank.safetensors into --out. Follows "
        "every round the "
        "server opens for this site.",
    )
    _connection_args(run)
    _data_args(run, out_help="output folder (default fedclient-out)")
    _extractor_args(run)
    run.add_argument("--coreset-percentage", type=float,
                     help="upload a fixed fraction of the site's patches (default: sized from "
                          "the server's k, see --upload-factor)")
    run.add_argument("--upload-factor", type=float,
                     help="upload min(the site's patches, F x k / S) rows, k the server's bank, "
                          "S its expected sites (default 2)")
    run.add_argument("--seed", type=int, help="seed of projection and start points (default 0)")
    run.add_argument("--batch-size", type=int, help="images per backbone pass (default 8)")
    run.add_argument("--max-rounds", type=int,
                     help="stop after this many rounds (default: every round the server opens)")
    run.add_argument("--round-timeout", type=float,
                     help="longest wait for a round's bank after uploading, s (default 3600)")
    run.add_argument("--max-upload-rate", type=float,
                     help="throttle uploads to this many bytes/s (default: unlimited)")
    run.add_argument("--validation-share", type=float,
                     help="share of the training images held back from the coreset to "
                     "calibrate the decisions on (default 0.15; 0: no decisions)")
    _calibration_args(run)

    score = commands.add_parser(
        "score", help="decide on images with a site model written earlier (no server needed)",
        description="Score --data's test images (all images of a plain folder) with the site "
        "model a previous `fedclient run` (or `fedclient calibrate`) wrote: each image's raw "
        "score, normalised score (0.5 = the threshold), decision and defect mask go to "
        "decisions.csv, decisions.jsonl and masks/; metrics.json, report.html and overlays/ "
        "too. A plain bank file (--bank) gives scores without decisions.",
    )
    score.add_argument("--config", type=Path, help="TOML file of settings (default: "
                       "$FEDCLIENT_CONFIG); FEDCLIENT_<SETTING> variables override it, flags "
                       "override both")
    _model_arg(score)
    score.add_argument("--bank", type=Path,
                       help="a plain bank file instead of --model (scores only, no decisions)")
    _data_args(score, out_help="output folder (default fedclient-score)")
    score.add_argument("-v", "--verbose", action="count", default=0, help="log to stderr")

    calibrate = commands.add_parser(
        "calibrate", help="calibrate a bank on validation images: writes a site model",
        description="Score --data's validation images with --bank (or re-calibrate --model) "
        "and write <--out>/site-model.safetensors with the thresholds. A folder with a "
        "labelled test split (MVTec / AutoVI layout) gives F1-optimal thresholds from its "
        "test images; a plain folder is taken as good images (threshold at --target-fpr). Use "
        "images the bank was not fitted on. `fedclient run` does this by itself.",
    )
    calibrate.add_argument("--config", type=Path, help="TOML file of settings")
    _model_arg(calibrate)
    calibrate.add_argument("--bank", type=Path, help="bank file to calibrate (instead of "
                           "--model)")
    _data_args(calibrate, out_help="output folder (default fedclient-out)")
    _calibration_args(calibrate)
    calibrate.add_argument("--batch-size", type=int, help="images per backbone pass "
                           "(default 8)")
    calibrate.add_argument("-v", "--verbose", action="count", default=0, help="log to stderr")

    inspect = commands.add_parser(
        "inspect", help="decide on each new image as it arrives (long-running)",
        description="Keep the site model warm and score every new image written into --watch "
        "DIR (file events through watchdog), or every image path read from stdin "
        "(--watch -). Each decision is appended to decisions.csv / decisions.jsonl in --out "
        "with its mask in masks/, and printed with its latency. A file that cannot be read "
        "(half written, corrupt) is retried --read-retries times, then skipped with one line; "
        "the watcher goes on. When the site model file is replaced (a new round), it is "
        "reloaded. Ctrl-C prints the summary.",
    )
    inspect.add_argument("--config", type=Path, help="TOML file of settings")
    _model_arg(inspect)
    inspect.add_argument("--watch", help="folder to watch, or - to read paths from stdin")
    inspect.add_argument("--out", type=Path, help="output folder (default fedclient-inspect)")
    inspect.add_argument("--device", choices=("cpu", "cuda"), help="where features are computed")
    inspect.add_argument("--weights", help="local backbone weights file (.safetensors/.pth)")
    inspect.add_argument("--batch-size", type=int,
                         help="files scored together when several are waiting (default 8)")
    inspect.add_argument("--include-existing", action="store_true",
                         help="also score the images already in the folder at start")
    inspect.add_argument("--max-images", type=int, help="stop after this many images")
    inspect.add_argument("--settle", type=float,
                         help="seconds a file must be quiet before it is read (default 0.2)")
    inspect.add_argument("--read-retries", type=int,
                         help="retries of a file that cannot be read yet (default 3)")
    inspect.add_argument("-v", "--verbose", action="count", default=0, help="log to stderr")

    status = commands.add_parser(
        "status", help="print the round's status (sites joined, rows, state)",
        description="Print the status of a round (default: the open one) as the server sees it: "
        "state, sites joined / complete, rows received, bank version. --follow streams changes "
        "until the round is ready or failed.",
    )
    _connection_args(status)
    status.add_argument("--round", type=int, default=0, help="round number (default: open)")
    status.add_argument("--follow", action="store_true", help="stream every change")
    status.add_argument("--json", action="store_true", help="print JSON lines")

    check = commands.add_parser(
        "check", help="check settings, data, weights, server reachability and the token",
        description="Check, without uploading anything: the data folder (every image and mask "
        "is read; each problem is named with its file; errors make the exit status 2, "
        "warnings do not); when --server is given, the token file, that the server "
        "answers and accepts the token, and which round is open for this site; then the "
        "feature extractor the site will use (the server's pinned one, else the flags below): "
        "its weights are loaded, and every image must have one size after its transform. "
        "Without --server, data and extractor are checked locally.",
    )
    _connection_args(check)
    check.add_argument("--data", type=Path, help="the site's images (checked when given)")
    check.add_argument("--categories", nargs="+", help="only these category folders of --data")
    _extractor_args(check, weights=True)

    init = commands.add_parser(
        "init-config", help="write an example site configuration (TOML)",
        description="Write a commented site configuration file: every setting, its default "
        "and what it does. The options below fill in the matching settings; the others are "
        "written with their defaults or commented out.",
    )
    init.add_argument("path", type=Path, nargs="?", default=Path("fedclient.toml"),
                      help="where to write it (default fedclient.toml; never overwritten)")
    init.add_argument("--server", default="127.0.0.1:50051",
                      help="fedserver address HOST:PORT to write (default 127.0.0.1:50051)")
    init.add_argument("--site-id", help="site id to write (default: left commented out)")
    init.add_argument("--token-file",
                      help="token file path to write, relative to the file (default "
                      "<site-id>.token, the name fedserver init-config gave it; site.token "
                      "without --site-id)")
    init.add_argument("--data", default="data",
                      help="data folder to write, relative to the file (default data)")
    return parser


# --- settings ----------------------------------------------------------------------------------


def _settings(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> dict[str, object]:
    """One dict keyed like the flags' dests: flags > FEDCLIENT_* environment > TOML > defaults.

    The TOML file is --config or $FEDCLIENT_CONFIG; its keys must be settings of
    fedclient.config.SiteSettings (an unknown key is an error naming it), relative paths in it
    are relative to the file.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, object] = defaults()
    config = getattr(args, "config", None) or (
        Path(environ[CONFIG_ENV]) if environ.get(CONFIG_ENV) else None
    )
    if config is not None:
        try:
            data = tomllib.loads(Path(config).read_text(encoding="utf-8"))
        except OSError as error:
            raise UsageError(f"cannot read config {config}: {error.strerror}") from None
        except tomllib.TOMLDecodeError as error:
            raise UsageError(f"config {config} is not valid TOML: {error}") from None
        unknown = sorted(set(data) - _SETTINGS)
        if unknown:
            raise UsageError(f"config {config}: unknown key(s) {unknown}")
        base = Path(config).resolve().parent
        for key, value in data.items():
            if key in _PATH_KEYS and isinstance(value, str) and value != "-":
                value = Path(value) if Path(value).is_absolute() else base / value
            values[key] = value
    try:
        values.update(env_overrides(ENV_PREFIX, SiteSettings, environ, reserved=(CONFIG_ENV,)))
    except SettingsError as error:
        raise UsageError(str(error)) from None
    for key, value in vars(args).items():
        if value is not None and not (
            key in ("verbose", "no_overlays", "include_existing") and not value
        ):
            values[key] = value
    return values


def _require(values: dict[str, object], key: str) -> object:
    if values.get(key) in (None, ""):
        raise UsageError(f"--{key.replace('_', '-')} is required (flag or config file)")
    return values[key]


def _connection(values: dict[str, object]) -> tuple[ConnectionConfig, str, RetryPolicy]:
    server = str(_require(values, "server"))
    site_id = str(_require(values, "site_id"))
    token_file = values.get("token_file")
    if token_file and not Path(str(token_file)).is_file():
        raise UsageError(
            f"token file {token_file} not found: put there the token file the server's "
            f"operator gave site {site_id} (fedserver init-config writes one per site in "
            "site-tokens/), or give its path with --token-file"
        )
    token = read_token_file(Path(str(token_file))) if token_file else None
    tls = None
    if values.get("tls_ca") or values.get("tls_cert"):
        tls = TLSConfig(
            ca_file=values.get("tls_ca"),  # type: ignore[arg-type]
            cert_file=values.get("tls_cert"),  # type: ignore[arg-type]
            key_file=values.get("tls_key"),  # type: ignore[arg-type]
            server_name=values.get("tls_server_name"),  # type: ignore[arg-type]
        )
    kwargs: dict[str, object] = {}
    if values.get("timeout") is not None:
        kwargs["call_timeout_s"] = float(values["timeout"])  # type: ignore[arg-type]
    if values.get("max_message_mb") is not None:
        kwargs["max_message_bytes"] = int(values["max_message_mb"]) << 20  # type: ignore[call-overload]
    connection = ConnectionConfig(server, token=token, tls=tls, **kwargs)  # type: ignore[arg-type]
    retry = RetryPolicy(max_attempts=int(values.get("retries", 6)))  # type: ignore[call-overload]
    return connection, site_id, retry


def _features(values: dict[str, object]) -> FeatureConfig:
    kwargs: dict[str, object] = {}
    if values.get("backbone"):
        kwargs["backbone"] = values["backbone"]
    if values.get("pretrained") is not None:
        kwargs["pretrained"] = bool(values["pretrained"])
    if values.get("weights"):
        kwargs["weights"] = str(values["weights"])
    if values.get("image_size"):
        kwargs["transform"] = ImageTransform(resize=int(values["image_size"]), crop=None)  # type: ignore[call-overload]
    if values.get("target_dim"):
        kwargs["target_embed_dim"] = int(values["target_dim"])  # type: ignore[call-overload]
    return FeatureConfig(**kwargs)  # type: ignore[arg-type]


class _ProgressBar:
    """Progress on stderr for a terminal (nothing otherwise, so logs and CI output stay clean):
    a bar while images are fitted or scored, one line per step in between (:meth:`say`), and
    the round's status while the site waits for its bank (:meth:`status`). A log record ends
    an unfinished bar line first (:meth:`break_line`, called by :class:`_EndBarLine`), so a
    warning never lands inside a bar."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._last = 0.0
        self._open = False

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (done < total and now - self._last < 0.1):
            return
        self._last = now
        width = 30
        filled = width * done // max(total, 1)
        sys.stderr.write(f"\r{stage:>5} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        self._open = done < total
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def say(self, text: str) -> None:
        """One step line (fitted, uploading, downloaded, ...)."""
        if self.enabled:
            self.break_line()
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def status(self, status: fpb.RoundStatus) -> None:
        """The round's state while waiting for the bank, rewritten in place."""
        if not self.enabled:
            return
        expected = status.sites_expected or "?"
        sys.stderr.write(f"\r       round {status.round}: {_STATES.get(status.state, '?')}, "
                         f"{status.sites_complete}/{expected} site(s) uploaded\033[K")
        self._open = True
        if status.state in (fpb.ROUND_STATE_READY, fpb.ROUND_STATE_FAILED):
            self.break_line()
        sys.stderr.flush()

    def break_line(self) -> None:
        if self._open:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._open = False


class _EndBarLine(logging.Filter):
    """Attached to the stderr log handler: ends the progress bar's line before a record."""

    def __init__(self, bar: _ProgressBar) -> None:
        super().__init__()
        self.bar = bar

    def filter(self, record: logging.LogRecord) -> bool:
        self.bar.break_line()
        return True


def _progress_bar() -> _ProgressBar:
    bar = _ProgressBar(sys.stderr.isatty())
    for handler in logging.getLogger().handlers:
        handler.addFilter(_EndBarLine(bar))
    return bar


def _short_note(status: fpb.RoundStatus) -> str | None:
    """The short-bank line of a READY round (core.federated.upload.short_bank_note); None
    otherwise, and from a server that does not send k (RoundStatus.global_bank_size 0)."""
    if status.state != fpb.ROUND_STATE_READY or not status.global_bank_size:
        return None
    return short_bank_note(status.global_bank_size, status.bank_rows, status.rows_received)


def _print_status(status: fpb.RoundStatus, as_json: bool) -> None:
    record = {
        "round": status.round,
        "state": _STATES.get(status.state, "unspecified"),
        "sites_expected": status.sites_expected,
        "quorum": status.quorum,
        "sites_joined": status.sites_joined,
        "sites_complete": status.sites_complete,
        "rows_received": status.rows_received,
        "bank_version": status.bank_version,
        "bank_rows": status.bank_rows,
        "global_bank_size": status.global_bank_size,
        # a READY bank with fewer rows than k asked for: the line that says so, else None
        "bank_short": _short_note(status),
        "message": status.message,
    }
    if as_json:
        print(json.dumps(record), flush=True)
        return
    expected = status.sites_expected or "?"
    # sites_joined counts the sites whose upload has begun (the server holds their summary),
    # not those that asked to join: the server logs that earlier.
    line = (
        f"round {status.round}: {record['state']}, {status.sites_joined}/{expected} sites "
        f"uploading or done, {status.sites_complete}/{expected} complete, "
        f"{status.rows_received} rows"
    )
    if status.state == fpb.ROUND_STATE_READY:
        line += f", bank v{status.bank_version} ({status.bank_rows} rows)"
        if record["bank_short"]:
            line += f"; {record['bank_short']}"
    if status.message:
        line += f" ({status.message})"
    print(line, flush=True)


# --- commands ----------------------------------------------------------------------------------


def _cmd_run(values: dict[str, object]) -> int:
    from fedclient.site import SiteOptions, run_site

    connection, site_id, retry = _connection(values)
    options = SiteOptions(
        data=Path(str(_require(values, "data"))),
        out_dir=Path(str(values.get("out", "fedclient-out"))),
        features=_features(values),
        categories=tuple(values["categories"]) if values.get("categories") else None,  # type: ignore[arg-type]
        weights=str(values["weights"]) if values.get("weights") else None,
        coreset_percentage=(None if values.get("coreset_percentage") is None
                            else float(values["coreset_percentage"])),  # type: ignore[arg-type]
        upload_factor=float(values.get("upload_factor", 2.0)),  # type: ignore[arg-type]
        seed=int(values.get("seed", 0)),  # type: ignore[call-overload]
        device=values.get("device"),  # type: ignore[arg-type]
        batch_size=int(values.get("batch_size", 8)),  # type: ignore[call-overload]
        max_rounds=values.get("max_rounds"),  # type: ignore[arg-type]
        round_timeout_s=float(values.get("round_timeout", 3600.0)),  # type: ignore[arg-type]
        overlays=not values.get("no_overlays", False),
        validation_share=float(values.get("validation_share", 0.15)),  # type: ignore[arg-type]
        target_fpr=float(values.get("target_fpr", 0.01)),  # type: ignore[arg-type]
        pixel_target_fpr=float(values.get("pixel_target_fpr", 0.01)),  # type: ignore[arg-type]
        knn=str(values.get("knn", "auto")),
    )
    rate = values.get("max_upload_rate")
    with SiteSession(
        connection, site_id, retry=retry,
        max_upload_bytes_per_s=float(rate) if rate else None,  # type: ignore[arg-type]
    ) as session:
        bar = _progress_bar()
        metrics = run_site(session, options, progress=bar, on_status=bar.status,
                           notify=bar.say)
    test = metrics.get("test") or {}
    rounds = metrics["rounds"]
    up = sum(r["bytes_up"] for r in rounds)  # type: ignore[attr-defined, index]
    down = sum(r["bytes_down"] for r in rounds)  # type: ignore[attr-defined, index]
    # Bytes are what this run moved: a rerun after a complete upload sends nothing again.
    held = sum(r["chunks_committed_at_start"] for r in rounds)  # type: ignore[attr-defined, index]
    resumed = f" (the server already held {held} chunk(s))" if held else ""
    scores = ", ".join(
        f"{k} {test[k]:.3f}"  # type: ignore[index]
        for k in ("image_auroc", "pixel_auroc", "au_pro")
        if isinstance(test, dict) and test.get(k) is not None
    )
    print(
        f"site {site_id}: bank v{metrics['bank_version']} ({metrics['bank_rows']} rows) after "
        f"{len(rounds)} round(s); this run sent {up} B{resumed}, received {down} B"  # type: ignore[arg-type]
        + (f"; {scores}" if scores else "")
        + f"; wrote {options.out_dir}"
    )
    short = metrics.get("bank_short")
    if isinstance(short, Mapping):
        print(f"site {site_id}: {short['note']}")
    _print_decisions(metrics)
    return 0


def _print_decisions(metrics: Mapping[str, object]) -> None:
    """The decision counts, the threshold and any calibration warning (run / score)."""
    test = metrics.get("test")
    decisions = test.get("decisions") if isinstance(test, Mapping) else None
    if isinstance(decisions, Mapping):
        rates = ", ".join(
            f"{name} {test[key]:.3f}"  # type: ignore[index]
            for key, name in (("false_positive_rate", "false-positive rate"),
                              ("miss_rate", "miss rate"))
            if isinstance(test, Mapping) and test.get(key) is not None
        )
        print(f"decisions: {decisions['anomalous']} anomalous, {decisions['normal']} normal; "
              f"{decisions['summary']}" + (f"; at the threshold: {rates}" if rates else ""))
    elif isinstance(metrics.get("calibration"), Mapping):  # calibrated, no test images
        from core.calibration import Calibration

        calibration = Calibration.from_dict(dict(metrics["calibration"]))  # type: ignore[call-overload]
        print(f"calibrated: {calibration.summary()}")
    else:
        print("decisions: none (the model has no calibration: scores only)")


def _model_file(values: dict[str, object]) -> Path:
    """--model, else --bank, else fedclient-out/site-model.safetensors, else its bank."""
    from fedclient.site import BANK_FILE, SITE_MODEL_FILE

    given = values.get("model") or values.get("bank")
    if given is not None:
        path = Path(str(given))
    else:
        path = Path("fedclient-out") / SITE_MODEL_FILE
        if not path.is_file():
            path = Path("fedclient-out") / BANK_FILE
    if not path.is_file():
        raise UsageError(f"model file {path} not found (give --model, or run `fedclient run`)")
    return path


def _cmd_score(values: dict[str, object]) -> int:
    from fedclient.site import score

    bank = _model_file(values)
    out = Path(str(values.get("out", "fedclient-score")))
    metrics = score(
        bank,
        Path(str(_require(values, "data"))),
        out,
        categories=tuple(values["categories"]) if values.get("categories") else None,  # type: ignore[arg-type]
        weights=str(values["weights"]) if values.get("weights") else None,
        device=values.get("device"),  # type: ignore[arg-type]
        overlays=not values.get("no_overlays", False),
        progress=_progress_bar(),
    )
    test = metrics["test"]
    assert isinstance(test, dict)
    auroc = test["image_auroc"]
    print(f"scored {len(test['image_scores'])} image(s) with bank v{metrics['bank_version']}; "
          + (f"image AUROC {auroc:.3f}; " if auroc is not None else "no labels: no AUROC; ")
          + f"wrote {out}")
    _print_decisions(metrics)
    return 0


def _cmd_calibrate(values: dict[str, object]) -> int:
    from fedclient.inspect import calibrate_file

    source = _model_file(values)
    out = Path(str(values.get("out", "fedclient-out")))
    site_model, path = calibrate_file(
        source,
        Path(str(_require(values, "data"))),
        out,
        categories=tuple(values["categories"]) if values.get("categories") else None,  # type: ignore[arg-type]
        weights=str(values["weights"]) if values.get("weights") else None,
        device=values.get("device"),  # type: ignore[arg-type]
        target_fpr=float(values.get("target_fpr", 0.01)),  # type: ignore[arg-type]
        pixel_target_fpr=float(values.get("pixel_target_fpr", 0.01)),  # type: ignore[arg-type]
        knn=str(values.get("knn", "auto")),
        batch_size=int(values.get("batch_size", 8)),  # type: ignore[call-overload]
    )
    calibration = site_model.calibration
    assert calibration is not None
    print(f"calibrated bank v{site_model.bank_version} ({site_model.model.memory_bank.shape[0]} "
          f"rows, {site_model.search.method} search) on {calibration.num_validation} image(s): "
          f"{calibration.summary()}; pixel threshold {calibration.pixel_threshold:.4f}; "
          f"wrote {path}")
    return 0


def _cmd_inspect(values: dict[str, object]) -> int:
    from core.sitemodel import SiteModel
    from fedclient.inspect import FolderWatcher, inspect_paths, stdin_lines

    path = _model_file(values)
    watch = str(_require(values, "watch"))
    weights = str(values["weights"]) if values.get("weights") else None
    device = values.get("device")

    def load(model_path: Path) -> SiteModel:
        return SiteModel.load(model_path, weights=weights, device=device)  # type: ignore[arg-type]

    site_model = load(path)
    if site_model.calibration is None:
        raise UsageError(f"{path} has no calibration: inspect needs a site model (`fedclient "
                         "run` writes site-model.safetensors; `fedclient calibrate` makes one)")
    out = Path(str(values.get("out", "fedclient-inspect")))
    max_images = values.get("max_images")
    limit = int(max_images) if max_images is not None else None  # type: ignore[call-overload]
    if watch == "-":
        summary = inspect_paths(site_model, stdin_lines(), out, max_images=limit)
        print(summary.line(), flush=True)
        return 0
    watcher = FolderWatcher(
        site_model, Path(watch), out, model_path=path, load_model=load,
        batch_size=int(values.get("batch_size", 8)),  # type: ignore[call-overload]
        settle_s=float(values.get("settle", 0.2)),  # type: ignore[arg-type]
        retries=int(values.get("read_retries", 3)),  # type: ignore[call-overload]
        include_existing=bool(values.get("include_existing", False)),
    )
    try:
        watcher.run(max_images=limit)
    except KeyboardInterrupt:
        watcher.stop()
    print(watcher.summary.line(), flush=True)
    return 0


def _cmd_status(values: dict[str, object]) -> int:
    connection, site_id, retry = _connection(values)
    with SiteSession(connection, site_id, retry=retry) as session:
        for status in session.watch(int(values.get("round", 0))):  # type: ignore[call-overload]
            _print_status(status, bool(values.get("json")))
            if not values.get("follow"):
                break
    return 0


def _check_data(values: dict[str, object]) -> bool:
    """``check --data``: print the layout, counts and every problem; True if no error."""
    from core.data.check import LAYOUT_NAMES, check_site_data

    categories = values.get("categories")
    found = check_site_data(Path(str(values["data"])),
                            tuple(categories) if categories else None)  # type: ignore[arg-type]
    status = "ok  " if not found.errors else "FAIL"
    layout = LAYOUT_NAMES[found.layout] if found.layout else "unusable"
    print(f"{status} data: {found.root}: {layout} layout, {found.images('train')} training "
          f"image(s), {found.images('test') or 'no'} test image(s)")
    for category, splits in found.counts.items():
        parts = "; ".join(
            f"{split} " + ", ".join(f"{defect} {n}" for defect, n in defects.items())
            for split, defects in splits.items()
        )
        print(f"       {category}: {parts or 'no images'}")
    for problem in found.errors:
        print(f"error   {problem.path}: {problem.message}")
    for problem in found.warnings:
        print(f"warning {problem.path}: {problem.message}")
    print(f"       data: {len(found.errors)} error(s), {len(found.warnings)} warning(s)")
    return not found.errors


def _check_extractor(values: dict[str, object], pinned: FeatureConfig | None,
                     data_ok: bool) -> bool:
    """``check``: load the extractor's weights (the server's pinned extractor, else the
    flags'), and with --data check every image's size after its transform; True if fine."""
    from core.features import PatchFeatureExtractor
    from fedclient.site import check_extractor, evaluation_protocol, load_site_data

    features = pinned or _features(values)
    whose = "pinned by the server" if pinned is not None else "from this site's settings"
    try:
        if values.get("data") and data_ok:
            train, test = load_site_data(Path(str(values["data"])), _categories(values))
            check_extractor(features, train, test)
        PatchFeatureExtractor(features)  # loads the weights
    except WeightsUnavailableError as error:
        print(f"FAIL extractor {features.backbone} ({whose}): {_weights_advice(error, 'run')}")
        return False
    except (ValueError, DatasetError) as error:
        print(f"FAIL extractor {features.backbone} ({whose}): {error}")
        return False
    provenance = features.weights_provenance()
    print(f"ok   extractor {features.backbone} ({whose}): weights loaded, {provenance['text']}")
    print(f"ok   evaluation: {evaluation_protocol(features.transform)[1]}")
    return True


def _categories(values: dict[str, object]) -> tuple[str, ...] | None:
    categories = values.get("categories")
    return tuple(categories) if categories else None  # type: ignore[arg-type]


def _cmd_check(values: dict[str, object]) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from fedclient.session import RoundConfig

    data_ok = _check_data(values) if values.get("data") else True
    if values.get("server") in (None, ""):
        extractor_ok = _check_extractor(values, None, data_ok)  # data and extractor only
        return 0 if data_ok and extractor_ok else 2
    connection, site_id, _ = _connection(values)
    print(f"ok   settings: site {site_id}, server {connection.address}, "
          f"{'TLS' if connection.tls else 'plaintext'}, "
          f"{'token from file' if connection.token else 'NO token'}")
    with SiteSession(connection, site_id, retry=RetryPolicy(max_attempts=1)) as session:
        health = health_pb2_grpc.HealthStub(session._channel)
        try:
            reply = health.Check(health_pb2.HealthCheckRequest(service=""),
                                 timeout=connection.call_timeout_s)
        except grpc.RpcError as error:
            raise SessionError(
                f"cannot reach the server at {connection.address}: "
                f"{error.code().name}: {error.details()}"  # type: ignore[attr-defined]
            ) from None
        serving = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        print(f"ok   server health: {serving}")
        joined = session.join()
        print(f"ok   token accepted for site {site_id}; round {joined.config.round} open, "
              f"bank size {joined.config.global_bank_size}, upload committed "
              f"{joined.upload.committed_sequence} chunk(s)")
    weights = str(values["weights"]) if values.get("weights") else None
    pinned = RoundConfig.from_proto(joined.config).feature_config(weights=weights)
    extractor_ok = _check_extractor(values, pinned, data_ok)
    return 0 if data_ok and extractor_ok else 2


def _cmd_init_config(args: argparse.Namespace) -> int:
    path: Path = args.path
    if path.exists():
        raise UsageError(f"{path} exists; not overwriting it")
    if args.token_file is None:
        args.token_file = f"{args.site_id}.token" if args.site_id else "site.token"
    filled = {key: getattr(args, key) for key in ("server", "site_id", "token_file", "data")
              if getattr(args, key) is not None}
    path.write_text(example_config(filled), encoding="utf-8")
    print(f"wrote {path}")
    return 0


def _weights_advice(error: WeightsUnavailableError, command: str) -> str:
    """One line: what is missing, and the flags that fix it for ``command``."""
    if command == "score":
        return (f"{error.problem}; the bank was built with these pretrained weights: pass "
                "--weights FILE, a local .safetensors/.pth state dict of them")
    return (f"{error.problem}. Pass --weights FILE (a local .safetensors/.pth state dict of "
            f"{error.backbone}, for a site without network), or --no-pretrained (random "
            "weights: for trying the system out only, the metrics then mean nothing)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", 0)
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "init-config":
            return _cmd_init_config(args)
        values = _settings(args)
        command = {"run": _cmd_run, "score": _cmd_score, "calibrate": _cmd_calibrate,
                   "inspect": _cmd_inspect, "status": _cmd_status,
                   "check": _cmd_check}[args.command]
        return command(values)
    except WeightsUnavailableError as error:
        print(f"fedclient: error: {_weights_advice(error, args.command)}", file=sys.stderr)
        return 2
    except SessionError as error:
        print(f"fedclient: error: {error}", file=sys.stderr)
        return 1
    except (UsageError, DatasetError, ValueError, FileNotFoundError) as error:
        print(f"fedclient: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedclient: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
