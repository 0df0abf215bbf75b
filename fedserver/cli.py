"""`fedserver serve | init-config`: the daemon's command line (argparse, like Flower's daemons).

    fedserver init-config --sites plant-1,plant-2,plant-3 --dir fed/
        writes fed/server.toml, fed/tokens (hashed) and fed/site-tokens/<site>.token (give
        each site its own file; the server never stores the plaintext)
    fedserver serve --config fed/server.toml [--bind 0.0.0.0:50051 ...]
        flags override the file; `fedserver serve --help` lists every setting

Exit status: 0 after a clean drain (SIGTERM/SIGINT), 2 for a configuration error (one line on
stderr naming the setting), 1 for any other start failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from core.codec import CODEC_PRESETS
from fedserver.auth import AuthError, new_token, write_tokens_file
from fedserver.config import ConfigError, load_config
from fedserver.federation import StateMismatchError
from fedserver.journal import JournalCorruptError

logger = logging.getLogger(__name__)

__all__ = ["build_parser", "main"]


def _sites(value: str) -> tuple[str, ...]:
    sites = tuple(s.strip() for s in value.split(",") if s.strip())
    if not sites:
        raise argparse.ArgumentTypeError("give at least one site id, comma-separated")
    return sites


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedserver",
        description="Federated PatchCore server: collects site coresets over gRPC, builds the "
        "global memory bank, serves it (delta downloads) to the sites.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="run the daemon until SIGTERM/SIGINT",
        description="Run the daemon. Settings come from --config (TOML, table [server]) and "
        "the flags below, which override it. Stops cleanly on SIGTERM/SIGINT: in-flight "
        "uploads get --grace-s seconds, committed chunks are already on disk.",
    )
    serve.add_argument("--config", type=Path, help="TOML file with the settings below")
    group = serve.add_argument_group("network and security")
    group.add_argument("--bind", help="HOST:PORT to listen on (default 127.0.0.1:50051; "
                       "port 0 picks a free port)")
    group.add_argument("--tls-cert", type=Path, help="PEM server certificate (with --tls-key)")
    group.add_argument("--tls-key", type=Path, help="PEM server private key")
    group.add_argument("--client-ca", type=Path,
                       help="PEM CA bundle: require client certificates signed by it (mTLS)")
    group.add_argument("--tokens-file", type=Path,
                       help="hashed per-site bearer tokens, 'site_id sha256' per line "
                       "(required; see init-config)")
    group.add_argument("--max-message-bytes", type=int,
                       help="max gRPC message size both ways, bytes (default 8 MiB)")
    group.add_argument("--max-workers", type=int,
                       help="rpc threads; each open stream holds one (default 32)")
    group = serve.add_argument_group("rounds")
    group.add_argument("--expected-sites", type=_sites,
                       help="comma-separated site ids a round waits for (default: every site "
                       "in the tokens file)")
    group.add_argument("--quorum", type=int,
                       help="least complete uploads that make a bank at the deadline "
                       "(default: all expected sites)")
    group.add_argument("--round-timeout-s", type=float,
                       help="seconds from a round's opening to its deadline (0 = none)")
    group.add_argument("--rounds", type=int, help="number of rounds (default 1)")
    group = serve.add_argument_group("selection")
    group.add_argument("--global-bank-size", type=int, help="k, rows of the global bank")
    group.add_argument("--strategy", choices=("coreset", "random"),
                       help="coverage-driven coreset selection (default) or random sampling")
    group.add_argument("--server-selection", choices=("prefix", "farthest_first"),
                       help="how the coreset strategy picks the bank: prefix merge of the "
                       "sites' pick-ordered uploads (default) or farthest-first over the union")
    group.add_argument("--seed", type=int, help="selection seed (default 0)")
    group.add_argument("--device", choices=("auto", "cpu", "cuda"),
                       help="where selection runs (auto: CUDA when available)")
    group.add_argument("--buffer-rows", type=int,
                       help="selector buffer in rows (default max(2k, 131072)); uploads beyond "
                       "it are merged and reduced, and the bank then depends on arrival order")
    group = serve.add_argument_group("wire and limits")
    group.add_argument("--codec", choices=sorted(CODEC_PRESETS),
                       help="codec asked of sites and used for the bank (default fp16)")
    group.add_argument("--byte-shuffle", action=argparse.BooleanOptionalAction, default=None,
                       help="override the codec preset's byte-shuffle (fp32/fp16/bf16 only; "
                       "default: the preset's, on)")
    group.add_argument("--zstd-level", type=int,
                       help="override the codec preset's zstd level, 1..22 (default: the "
                       "preset's, 1)")
    group.add_argument("--max-chunk-bytes", type=int,
                       help="largest decoded chunk payload, bytes (default 1 MiB, max 3 MiB)")
    group.add_argument("--max-rows-per-site", type=int,
                       help="most rows one site may upload per round (default 1,000,000)")
    group.add_argument("--feature-fingerprint",
                       help="pin the feature extraction (64 hex; default: the first site's)")
    group.add_argument("--feature-dim", type=int, help="pin D (default: the first site's)")
    group = serve.add_argument_group("state and process")
    group.add_argument("--state-dir", type=Path,
                       help="journal and bank versions (required; created if missing)")
    group.add_argument("--grace-s", type=float,
                       help="seconds in-flight rpcs get on SIGTERM (default 10)")
    group.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                       help="log level (default INFO)")

    init = commands.add_parser(
        "init-config", help="write a server.toml, a hashed tokens file and one token per site",
        description="Create a configuration directory: server.toml (every setting, commented), "
        "tokens (SHA-256 of each site's token) and site-tokens/<site>.token (the plaintext "
        "token to hand to that site, mode 0600).",
    )
    init.add_argument("--sites", type=_sites, required=True,
                      help="comma-separated site ids, e.g. plant-1,plant-2,plant-3")
    init.add_argument("--dir", type=Path, required=True, help="directory to write into")
    init.add_argument("--bind", default="127.0.0.1:50051", help="bind address to write")
    init.add_argument("--global-bank-size", type=int, default=10000, help="k to write")
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    return parser


_SERVE_KEYS = (
    "bind", "tls_cert", "tls_key", "client_ca", "tokens_file", "max_message_bytes",
    "max_workers", "expected_sites", "quorum", "round_timeout_s", "rounds", "global_bank_size",
    "strategy", "server_selection", "seed", "device", "buffer_rows", "codec", "byte_shuffle",
    "zstd_level", "max_chunk_bytes",
    "max_rows_per_site", "feature_fingerprint", "feature_dim", "state_dir", "grace_s",
    "log_level",
)

_TEMPLATE = """\
# fedserver configuration (fedserver serve --config THIS_FILE). Relative paths are relative to
# this file. Every key can also be given as a flag (--state-dir, ...), which wins.
[server]
bind = "{bind}"
state_dir = "state"            # journal + bank versions
tokens_file = "tokens"         # 'site_id sha256(token)' lines
# tls_cert = "server.pem"      # TLS: certificate and key together
# tls_key = "server.key"
# client_ca = "ca.pem"         # mTLS: require client certificates signed by this CA
expected_sites = [{sites}]
quorum = 0                     # 0 = all expected sites
round_timeout_s = 0            # 0 = no deadline
rounds = 1
global_bank_size = {k}
strategy = "coreset"           # or "random"
server_selection = "prefix"    # or "farthest_first" (coreset strategy only)
seed = 0
device = "auto"                # auto | cpu | cuda
codec = "fp16"                 # {codecs}
# byte_shuffle = true          # override the preset's byte-shuffle (not for int8 / int4)
# zstd_level = 1               # override the preset's zstd level (1..22)
max_chunk_bytes = 1048576
max_rows_per_site = 1000000
max_message_bytes = 8388608
max_workers = 32
grace_s = 10
log_level = "INFO"
# Pin the extractor (sites receive these settings; the fingerprint is derived from them):
# [server.extractor]
# backbone = "wide_resnet50_2"
# layers = ["layer2", "layer3"]
# pretrained = true
# pretrain_embed_dim = 1024
# target_embed_dim = 1024
# patch_size = 3
# resize = 256
# crop = 224
"""


def _init_config(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    config, tokens, site_dir = directory / "server.toml", directory / "tokens", directory / (
        "site-tokens"
    )
    existing = [p for p in (config, tokens) if p.exists()]
    if existing and not args.force:
        print(f"fedserver: {existing[0]} exists; use --force to overwrite", file=sys.stderr)
        return 2
    site_dir.mkdir(parents=True, exist_ok=True)
    site_tokens = {site: new_token() for site in args.sites}
    write_tokens_file(tokens, site_tokens)
    for site, token in site_tokens.items():
        path = site_dir / f"{site}.token"
        path.write_text(token + "\n", encoding="utf-8")
        path.chmod(0o600)
    config.write_text(_TEMPLATE.format(
        bind=args.bind, sites=", ".join(f'"{s}"' for s in args.sites), k=args.global_bank_size,
        codecs=" | ".join(sorted(CODEC_PRESETS)),
    ), encoding="utf-8")
    print(f"wrote {config}, {tokens} and {len(site_tokens)} token(s) in {site_dir}/")
    print(f"start the server with: fedserver serve --config {config}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from fedserver.daemon import serve

    overrides = {key: getattr(args, key) for key in _SERVE_KEYS}
    try:
        config = load_config(args.config, overrides)
    except ConfigError as error:
        print(f"fedserver: configuration error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return serve(config)
    except (ConfigError, AuthError, StateMismatchError) as error:
        print(f"fedserver: configuration error: {error}", file=sys.stderr)
        return 2
    except (JournalCorruptError, RuntimeError, OSError) as error:
        print(f"fedserver: cannot start: {error}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "init-config":
        return _init_config(args)
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
