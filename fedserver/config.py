"""ServerConfig: every setting of `fedserver serve`, from TOML and flags, validated once.

A frozen dataclass: the daemon reads it once at start and never re-parses strings afterwards.
`load_config(path, overrides)` merges a TOML file (table ``[server]`` or top-level keys) with
command-line overrides (flags win) and validates the result; every error is a ConfigError
naming the key. The keys are the field names below; ``fedserver init-config`` writes a commented
example.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from core.codec import CODEC_PRESETS, ZSTD_LEVEL_RANGE, CodecConfig, InvalidCodecConfigError
from core.serde import MAX_CHUNK_BYTES_LIMIT
from core.settings import SettingsError, env_overrides, toml_example

if TYPE_CHECKING:  # imported where used: core.features imports torch (slow to import)
    from core.features import FeatureConfig

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_ENV",
    "ENV_PREFIX",
    "ConfigError",
    "Device",
    "ServerConfig",
    "example_config",
    "load_config",
]

#: Environment variables FEDSERVER_<FIELD> override the TOML file (flags override them).
ENV_PREFIX: Final[str] = "FEDSERVER"
#: The config file, when --config is not given (the Docker image sets it).
CONFIG_ENV: Final[str] = "FEDSERVER_CONFIG"

Device = Literal["auto", "cpu", "cuda"]

#: Explicit gRPC message limit. The largest message of the protocol is one chunk: at most
#: 3 MiB of payload + quantisation parameters + framing; 8 MiB leaves room without letting a
#: peer make the server buffer an arbitrary message.
DEFAULT_MAX_MESSAGE_BYTES: Final[int] = 8 << 20


def _help(text: str) -> dict[str, str]:
    """Field metadata: what the setting does (init-config writes it into server.toml)."""
    return {"help": text}


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or out of range (names the key)."""


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one fedserver process.

    Each field's ``help`` metadata says what it does; ``fedserver init-config`` writes them all
    into a commented server.toml and ``fedserver serve --help`` lists the flags. Sources, in
    order of precedence: flag > environment (``FEDSERVER_<FIELD>``) > TOML > default.
    ``extra`` collects unknown keys so that they are refused with their names.
    """

    state_dir: Path = field(metadata={"help": (
        "Directory of the journal and the bank versions (created if missing). Keep it on a\n"
        "persistent volume: a restarted server replays it and loses no acknowledged chunk.")})
    tokens_file: Path = field(metadata={"help": (
        "Hashed per-site bearer tokens, one 'site_id sha256-hex' line per site\n"
        "(fedserver init-config writes it; the plaintext tokens are never stored).")})
    bind: str = field(default="127.0.0.1:50051", metadata=_help(
        "HOST:PORT the gRPC server listens on; port 0 picks a free port.\n"
        "0.0.0.0:50051 listens on every interface."))
    tls_cert: Path | None = field(default=None, metadata=_help(
        "PEM server certificate; with tls_key enables TLS (both or neither; neither = "
        "plaintext,\n"
        "only for loopback or a trusted network)."))
    tls_key: Path | None = field(default=None, metadata=_help(
        "PEM private key of tls_cert."))
    client_ca: Path | None = field(default=None, metadata=_help(
        "PEM CA bundle; when set (with TLS) every site must present a certificate it "
        "signed (mTLS)."))
    expected_sites: tuple[str, ...] = field(default=(), metadata=_help(
        "Site ids a round waits for; empty = every site of the tokens file."))
    quorum: int = field(default=0, metadata=_help(
        "Least complete uploads that still make a bank at the deadline; 0 = all expected "
        "sites."))
    round_timeout_s: float = field(default=0.0, metadata=_help(
        "Seconds from a round's opening to its deadline; 0 = no deadline (wait for every "
        "expected site)."))
    rounds: int = field(default=1, metadata=_help(
        "Rounds opened automatically, one after the other (1: local coresets only; later "
        "rounds\nupload only novel patches). Beyond them a round opens by operator command "
        "(`fedserver round open`)\nor by round_interval_s."))
    round_interval_s: float = field(default=0.0, metadata=_help(
        "Open the next round this many seconds after the previous one is ready, without end; "
        "0 = only\n`rounds` and operator commands open rounds."))
    global_bank_size: int = field(default=10000, metadata=_help(
        "k, rows of the global memory bank."))
    strategy: Literal["coreset", "random"] = field(default="coreset", metadata=_help(
        "\"coreset\" (coverage-driven selection, see server_selection) or \"random\" "
        "(sampling in\n"
        "proportion to site size)."))
    server_selection: Literal["prefix", "farthest_first"] = field(default="prefix", metadata=_help(
        "How the coreset strategy picks the bank: \"prefix\" (the k rows the sites picked "
        "at the\n"
        "largest local separation) or \"farthest_first\" (farthest-first again over the "
        "union)."))
    floor_fraction: float | None = field(default=None, metadata=_help(
        "prefix selection: each site first keeps this fraction of its proportional share "
        "of the bank,\n"
        "k x num_patches_i / all patches (its rows of largest separation); the rest follows "
        "coverage.\n"
        "Unset = 0.1; 0 = the plain k largest separations (a compact site can be starved)."))
    max_site_share: float | None = field(default=None, metadata=_help(
        "prefix selection: most rows one site may keep, as a fraction of k (0 < x <= 1); "
        "unset = no\n"
        "cap. The round report says when it applied. A site far above its share of "
        "patches is\n"
        "flagged in the report and the log either way."))
    seed: int = field(default=0, metadata=_help(
        "Seeds the selection (projection, start point, sampling keys)."))
    codec: str = field(default="fp16", metadata=_help(
        "Codec the sites upload with and the bank is sent with: "
        + " | ".join(sorted(CODEC_PRESETS)) + "."))
    byte_shuffle: bool | None = field(default=None, metadata=_help(
        "Override the codec preset's byte-shuffle; unset = the preset's (must stay false for\n"
        "int8 / int4, where shuffling single bytes does nothing). Does not change decoded values."))
    zstd_level: int | None = field(default=None, metadata=_help(
        "Override the codec preset's zstd level, 1..22; unset = the preset's (1). Does not\n"
        "change decoded values, so it is not a selection setting."))
    max_chunk_bytes: int = field(default=1 << 20, metadata=_help(
        "Largest decoded chunk payload, bytes (at most 3 MiB)."))
    device: Device = field(default="auto", metadata=_help(
        "Where selection runs: \"auto\" (CUDA when available), \"cpu\" or \"cuda\"\n"
        "(\"cuda\" without a GPU is an error, never a silent CPU run)."))
    buffer_rows: int | None = field(default=None, metadata=_help(
        "The selector's buffer, rows; unset = max(2k, 131072). Uploads beyond it are "
        "reduced in\n"
        "arrival order (farthest_first only)."))
    feature_fingerprint: str = field(default="", metadata=_help(
        "Pin the federation's feature extraction (64 hex); \"\" = the first accepted site "
        "fixes it."))
    feature_dim: int = field(default=0, metadata=_help(
        "Pin the feature dimension D; 0 = the first accepted site fixes it (or the "
        "extractor's D)."))
    extractor: Mapping[str, Any] | None = field(default=None, metadata=_help(
        "Pin the feature extraction by its settings (sites receive them when they join "
        "and the\n"
        "fingerprint is computed from them); a table with the keys below. crop = 0 means "
        "no crop."))
    max_rows_per_site: int = field(default=0, metadata=_help(
        "Most rows one site may upload in a round (a site announcing more is refused with\n"
        "RESOURCE_EXHAUSTED); 0 = the site's share of the selection buffer (buffer_rows over the\n"
        "expected sites), which a set value may lower but not exceed (checked at start)."))
    max_message_bytes: int = field(default=DEFAULT_MAX_MESSAGE_BYTES, metadata=_help(
        "gRPC max send/receive message length, bytes."))
    max_workers: int = field(default=8, metadata=_help(
        "Threads for the rpcs' CPU work (decoding chunks, encoding bank chunks). Open streams\n"
        "hold none: the server is asyncio, a waiting rpc is a parked coroutine."))
    max_rpcs_per_site: int = field(default=16, metadata=_help(
        "Most rpcs one site may hold open at once; more are refused with RESOURCE_EXHAUSTED\n"
        "and trailing metadata fedpatchcore-retry: concurrency (fedclient retries them)."))
    max_exempt_streams_per_peer: int = field(default=8, metadata=_help(
        "Most open health Watch / reflection streams (no token needed) per peer address;\n"
        "health Check is never refused, and authenticated rpcs never draw on this budget."))
    max_exempt_streams: int = field(default=64, metadata=_help(
        "Most open health Watch / reflection streams in all (see max_exempt_streams_per_peer)."))
    grace_s: float = field(default=10.0, metadata=_help(
        "On SIGTERM, seconds in-flight rpcs get to finish before they are cancelled\n"
        "(committed chunks are already on disk)."))
    fsync: bool = field(default=True, metadata=_help(
        "fsync the journal before acknowledging a chunk (switch off only in tests)."))
    log_level: str = field(default="INFO", metadata=_help(
        "\"DEBUG\", \"INFO\", \"WARNING\" or \"ERROR\"."))
    log_format: Literal["text", "json"] = field(default="text", metadata=_help(
        "\"text\" (human-readable lines) or \"json\" (one JSON object per line: time, level, "
        "logger,\n"
        "message; for log collectors)."))
    metrics_port: int = field(default=0, metadata=_help(
        "Port of the Prometheus /metrics HTTP endpoint; 0 = off, -1 = a free port "
        "(logged:\n"
        "\"metrics on http://HOST:PORT/metrics\"; for tests)."))
    metrics_host: str = field(default="127.0.0.1", metadata=_help(
        "Address the metrics endpoint binds; 0.0.0.0 exposes it on every interface\n"
        "(do that only behind a firewall: it has no authentication)."))
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", _path("state_dir", self.state_dir))
        object.__setattr__(self, "tokens_file", _path("tokens_file", self.tokens_file))
        for name in ("tls_cert", "tls_key", "client_ca"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _path(name, value))
        if self.extra:
            raise ConfigError(f"unknown configuration key(s): {sorted(self.extra)}")
        host, sep, port = self.bind.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"bind must be HOST:PORT with PORT in 0..65535, got {self.bind!r}")
        if not self.tokens_file.is_file():
            raise ConfigError(f"tokens_file {self.tokens_file} does not exist")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key must be given together")
        if self.client_ca is not None and self.tls_cert is None:
            raise ConfigError("client_ca (mTLS) needs tls_cert and tls_key")
        for name in ("tls_cert", "tls_key", "client_ca"):
            value = getattr(self, name)
            if value is not None and not value.is_file():
                raise ConfigError(f"{name} {value} does not exist")
        sites = self.expected_sites
        if isinstance(sites, str) or not all(isinstance(s, str) and s.strip() for s in sites):
            raise ConfigError(f"expected_sites must be a list of non-empty ids, got {sites!r}")
        object.__setattr__(self, "expected_sites", tuple(sites))
        if len(set(self.expected_sites)) != len(self.expected_sites):
            raise ConfigError(f"expected_sites has duplicates: {list(self.expected_sites)}")
        _int_range("quorum", self.quorum, 0, len(self.expected_sites) or 10**6)
        if not isinstance(self.round_timeout_s, int | float) or not (
            math.isfinite(self.round_timeout_s) and self.round_timeout_s >= 0
        ):
            raise ConfigError(
                f"round_timeout_s must be finite and >= 0, got {self.round_timeout_s}"
            )
        _int_range("rounds", self.rounds, 1, 1000)
        if not isinstance(self.round_interval_s, int | float) or not (
            math.isfinite(self.round_interval_s) and self.round_interval_s >= 0
        ):
            raise ConfigError(
                f"round_interval_s must be finite and >= 0, got {self.round_interval_s}"
            )
        _int_range("global_bank_size", self.global_bank_size, 1, 10**8)
        if self.strategy not in ("coreset", "random"):
            raise ConfigError(f"strategy must be 'coreset' or 'random', got {self.strategy!r}")
        if self.server_selection not in ("prefix", "farthest_first"):
            raise ConfigError(
                "server_selection must be 'prefix' or 'farthest_first', got "
                f"{self.server_selection!r}"
            )
        for name in ("floor_fraction", "max_site_share"):
            value = getattr(self, name)
            if value is None:
                continue
            if self.strategy != "coreset" or self.server_selection != "prefix":
                raise ConfigError(f"{name} applies to the prefix selection only (strategy "
                                  "'coreset', server_selection 'prefix'); unset it")
            low_ok = value >= 0 if name == "floor_fraction" else value > 0
            if not isinstance(value, int | float) or isinstance(value, bool) or not (
                low_ok and value <= 1
            ):
                bounds = "[0, 1]" if name == "floor_fraction" else "(0, 1]"
                raise ConfigError(f"{name} must be in {bounds}, got {value!r}")
            object.__setattr__(self, name, float(value))
        _int_range("seed", self.seed, 0, 2**63 - 1)
        if self.codec not in CODEC_PRESETS:
            raise ConfigError(f"codec must be one of {sorted(CODEC_PRESETS)}, got {self.codec!r}")
        if self.byte_shuffle is not None and not isinstance(self.byte_shuffle, bool):
            raise ConfigError(f"byte_shuffle must be a bool, got {self.byte_shuffle!r}")
        if self.zstd_level is not None:
            low, high = ZSTD_LEVEL_RANGE
            _int_range("zstd_level", self.zstd_level, low, high)
        try:
            self.codec_config  # noqa: B018 (validates the preset + overrides combination)
        except InvalidCodecConfigError as error:
            raise ConfigError(f"codec {self.codec!r} with byte_shuffle = {self.byte_shuffle}: "
                              f"{error}") from error
        _int_range("max_chunk_bytes", self.max_chunk_bytes, 1024, MAX_CHUNK_BYTES_LIMIT)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.buffer_rows is not None:
            _int_range("buffer_rows", self.buffer_rows, self.global_bank_size + 1, 10**9)
        fingerprint = self.feature_fingerprint
        if fingerprint and (
            len(fingerprint) != 64 or any(c not in "0123456789abcdef" for c in fingerprint)
        ):
            raise ConfigError(
                f"feature_fingerprint must be 64 lowercase hex characters or empty, got "
                f"{fingerprint!r}"
            )
        _int_range("feature_dim", self.feature_dim, 0, 2**32 - 1)
        features = self.feature_config()
        if features is not None:
            fingerprint = features.fingerprint()
            if self.feature_fingerprint and self.feature_fingerprint != fingerprint:
                raise ConfigError(
                    f"feature_fingerprint {self.feature_fingerprint[:12]}... disagrees with the "
                    f"extractor settings' fingerprint {fingerprint[:12]}..."
                )
            object.__setattr__(self, "feature_fingerprint", fingerprint)
            if self.feature_dim and self.feature_dim != features.target_embed_dim:
                raise ConfigError(
                    f"feature_dim {self.feature_dim} disagrees with extractor.target_embed_dim "
                    f"{features.target_embed_dim}"
                )
            object.__setattr__(self, "feature_dim", features.target_embed_dim)
        _int_range("max_rows_per_site", self.max_rows_per_site, 0, 2**40)
        _int_range("max_message_bytes", self.max_message_bytes, MAX_CHUNK_BYTES_LIMIT + 65536,
                   1 << 30)
        _int_range("max_workers", self.max_workers, 1, 256)
        _int_range("max_rpcs_per_site", self.max_rpcs_per_site, 4, 4096)
        _int_range("max_exempt_streams_per_peer", self.max_exempt_streams_per_peer, 1, 4096)
        _int_range("max_exempt_streams", self.max_exempt_streams, 1, 65536)
        if not isinstance(self.grace_s, int | float) or not 0 <= self.grace_s <= 3600:
            raise ConfigError(f"grace_s must be in [0, 3600], got {self.grace_s}")
        if not isinstance(self.fsync, bool):
            raise ConfigError(f"fsync must be a bool, got {self.fsync!r}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be 'text' or 'json', got {self.log_format!r}")
        _int_range("metrics_port", self.metrics_port, -1, 65535)
        if not isinstance(self.metrics_host, str) or not self.metrics_host.strip():
            raise ConfigError(f"metrics_host must be a host name or address, got "
                              f"{self.metrics_host!r}")
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level must be DEBUG, INFO, WARNING or ERROR, got "
                              f"{self.log_level!r}")

    def feature_config(self) -> FeatureConfig | None:
        """The pinned extractor as a core.features.FeatureConfig (None when not pinned)."""
        if self.extractor is None:
            return None
        from core.features import FeatureConfig

        data = dict(self.extractor)
        pretrained = data.pop("pretrained", True)
        if not isinstance(pretrained, bool):
            raise ConfigError(f"extractor.pretrained must be a bool, got {pretrained!r}")
        missing = {"backbone", "layers", "pretrain_embed_dim", "target_embed_dim", "patch_size",
                   "resize", "crop"} - set(data)
        unknown = set(data) - {"backbone", "layers", "pretrain_embed_dim", "target_embed_dim",
                               "patch_size", "resize", "crop", "init_seed"}
        if missing or unknown:
            raise ConfigError(
                f"extractor: missing key(s) {sorted(missing)}, unknown key(s) {sorted(unknown)}"
            )
        if data.get("crop") == 0:  # TOML has no null: crop = 0 means no crop
            data["crop"] = None
        try:
            return FeatureConfig.from_dict(data, pretrained=pretrained)
        except (TypeError, ValueError, KeyError) as error:
            raise ConfigError(f"extractor: {error}") from error

    @property
    def codec_config(self) -> CodecConfig:
        """The codec preset with the byte_shuffle / zstd_level overrides, as a CodecConfig."""
        overrides: dict[str, Any] = {}
        if self.byte_shuffle is not None:
            overrides["byte_shuffle"] = self.byte_shuffle
        if self.zstd_level is not None:
            overrides["zstd_level"] = self.zstd_level
        return dataclasses.replace(CODEC_PRESETS[self.codec], **overrides)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def selection_device(self) -> str:
        """"cuda" or "cpu": where the aggregator's selection runs (auto -> CUDA if available).

        Raises ConfigError for device = "cuda" on a machine without CUDA: asking for a GPU and
        silently getting a CPU would hide a misconfiguration.
        """
        import torch

        available = torch.cuda.is_available()
        if self.device == "cuda" and not available:
            raise ConfigError("device = 'cuda' but torch sees no CUDA device")
        if self.device == "auto":
            return "cuda" if available else "cpu"
        return self.device


def _path(name: str, value: object) -> Path:
    if not isinstance(value, str | Path) or not str(value):
        raise ConfigError(f"{name} must be a path, got {value!r}")
    return Path(value)


def _int_range(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"{name} must be an int in [{low}, {high}], got {value!r}")


FIELD_NAMES: Final[frozenset[str]] = frozenset(
    f.name for f in dataclasses.fields(ServerConfig) if f.name != "extra"
)


def load_config(
    path: Path | None,
    overrides: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServerConfig:
    """TOML file (optional) + environment + overrides (flags) -> validated ServerConfig.

    Precedence: overrides (None values ignored) > ``environ``'s ``FEDSERVER_<FIELD>`` variables
    (parsed by the field's type; None = the environment is not consulted) > the file >
    defaults. With ``path`` None, ``FEDSERVER_CONFIG`` in ``environ`` names the file.
    Relative paths in the file are resolved against the file's directory, so a config can be
    moved with its tokens and certificates; relative paths from the environment or flags are
    relative to the working directory. Raises ConfigError (unknown key or variable, bad value,
    unreadable or invalid TOML).
    """
    values: dict[str, object] = {}
    if path is None and environ is not None and environ.get(CONFIG_ENV):
        path = Path(environ[CONFIG_ENV])
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as error:
            raise ConfigError(f"cannot read config {path}: {error}") from error
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config {path} is not valid TOML: {error}") from error
        table = data.get("server", data)
        if not isinstance(table, dict):
            raise ConfigError(f"config {path}: [server] must be a table")
        base = Path(path).resolve().parent
        for key, value in table.items():
            if key in ("state_dir", "tokens_file", "tls_cert", "tls_key", "client_ca") and (
                isinstance(value, str) and value and not Path(value).is_absolute()
            ):
                value = str(base / value)
            values[key] = value
    if environ is not None:
        try:
            values.update(env_overrides(ENV_PREFIX, ServerConfig, environ, reserved=(CONFIG_ENV,)))
        except SettingsError as error:
            raise ConfigError(str(error)) from error
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    unknown = {k: v for k, v in values.items() if k not in FIELD_NAMES}
    known = {k: v for k, v in values.items() if k in FIELD_NAMES}
    for required in ("state_dir", "tokens_file"):
        if required not in known:
            flag = "--" + required.replace("_", "-")
            raise ConfigError(f"{required} is required (config file or {flag})")
    if "expected_sites" in known and isinstance(known["expected_sites"], list):
        known["expected_sites"] = tuple(known["expected_sites"])  # type: ignore[arg-type]
    try:
        return ServerConfig(**known, extra=unknown)  # type: ignore[arg-type]
    except TypeError as error:  # a value of a type the dataclass cannot take at all
        raise ConfigError(str(error)) from error


#: TOML literals of the settings that have no default value to show (written commented out).
_EXAMPLES: Final[dict[str, str]] = {
    "tls_cert": '"server.pem"',
    "tls_key": '"server.key"',
    "client_ca": '"ca.pem"',
    "buffer_rows": "131072",
    "floor_fraction": "0.1",
    "max_site_share": "0.5",
    "byte_shuffle": "true",
    "zstd_level": "3",
    "extractor": (
        '{ backbone = "wide_resnet50_2", layers = ["layer2", "layer3"], pretrained = true, '
        "pretrain_embed_dim = 1024, target_embed_dim = 1024, patch_size = 3, resize = 256, "
        "crop = 224 }"
    ),
}

_HEADER: Final[str] = """\
fedserver configuration: fedserver serve --config THIS_FILE
Every setting below, with what it does and its default. Relative paths are relative to this
file. Precedence: command-line flag (--quorum 2) > environment variable (FEDSERVER_QUORUM=2;
FEDSERVER_CONFIG names this file) > this file > default."""


def example_config(values: Mapping[str, object]) -> str:
    """The commented server.toml ``fedserver init-config`` writes: every setting of
    ServerConfig with its help and default, ``values`` (e.g. bind, expected_sites) filled in."""
    return toml_example(ServerConfig, values, header=_HEADER, table="server", examples=_EXAMPLES)
