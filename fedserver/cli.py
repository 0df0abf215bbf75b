"""`fedserver serve | init-config | health`: the daemon's command line (argparse, like Flower's).

    fedserver init-config --sites plant-1,plant-2,plant-3 --dir fed/
        writes fed/server.toml, fed/tokens (hashed) and fed/site-tokens/<site>.token (give
        each site its own file; the server never stores the plaintext)
    fedserver serve --config fed/server.toml [--bind 0.0.0.0:50051 ...]
        flags override the environment (FEDSERVER_<SETTING>), which overrides the file;
        `fedserver serve --help` lists every setting
    fedserver health --address 127.0.0.1:50051
        exit 0 when the server's gRPC health service says SERVING (Docker HEALTHCHECK)
    fedserver site add|revoke|withdraw|list, fedserver round open
        the operator's commands to a running server (fedserver.operator_cli, docs/operator.md)

Exit status: 0 after a clean drain (SIGTERM/SIGINT), 2 for a configuration error (one line on
stderr naming the setting), 1 for any other start failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tomllib
from pathlib import Path

from core.codec import CODEC_PRESETS
from fedserver.auth import OPERATOR, AuthError, new_token, write_tokens_file
from fedserver.config import CONFIG_ENV, ConfigError, example_config, load_config
from fedserver.health import check_health
from fedserver.journal import write_private
from fedserver.logs import configure_logging
from fedserver.operator_cli import OPERATOR_TOKEN_FILE, add_operator_commands, run_operator

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
        description="Run the daemon. Settings come from --config (TOML, table [server]), the "
        "environment and the flags below. Precedence: flag > environment variable "
        "FEDSERVER_<SETTING> (FEDSERVER_BIND, FEDSERVER_QUORUM, ...; FEDSERVER_CONFIG names the "
        "file) > TOML file > default. Stops cleanly on SIGTERM/SIGINT: health turns "
        "NOT_SERVING, in-flight uploads get --grace-s seconds, committed chunks are already on "
        "disk.",
    )
    serve.add_argument("--config", type=Path,
                       help="TOML file with the settings below (default: $FEDSERVER_CONFIG)")
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
                       help="threads for the rpcs' CPU work; open streams hold none (default 8)")
    group.add_argument("--max-rpcs-per-site", type=int,
                       help="most rpcs one site may hold open (default 16; more are refused "
                       "with a retryable RESOURCE_EXHAUSTED)")
    group.add_argument("--max-exempt-streams-per-peer", type=int,
                       help="most open health Watch / reflection streams per peer address "
                       "(default 8)")
    group.add_argument("--max-exempt-streams", type=int,
                       help="most open health Watch / reflection streams in all (default 64)")
    group = serve.add_argument_group("rounds")
    group.add_argument("--expected-sites", type=_sites,
                       help="comma-separated site ids a round waits for (default: every site "
                       "in the tokens file)")
    group.add_argument("--quorum", type=int,
                       help="least complete uploads that make a bank at the deadline "
                       "(default: all expected sites)")
    group.add_argument("--round-timeout-s", type=float,
                       help="seconds from a round's opening to its deadline (0 = none)")
    group.add_argument("--rounds", type=int,
                       help="rounds opened automatically (default 1); later ones open by "
                       "`fedserver round open` or --round-interval-s")
    group.add_argument("--round-interval-s", type=float,
                       help="open the next round this long after the previous one is ready "
                       "(0 = off, the default)")
    group = serve.add_argument_group("selection")
    group.add_argument("--global-bank-size", type=int, help="k, rows of the global bank")
    group.add_argument("--strategy", choices=("coreset", "random"),
                       help="coverage-driven coreset selection (default) or random sampling")
    group.add_argument("--server-selection", choices=("prefix", "farthest_first"),
                       help="how the coreset strategy picks the bank: prefix merge of the "
                       "sites' pick-ordered uploads (default) or farthest-first over the union")
    group.add_argument("--floor-fraction", type=float,
                       help="prefix selection: each site's guaranteed fraction of its "
                            "proportional share of the bank (default 0.1)")
    group.add_argument("--max-site-share", type=float,
                       help="prefix selection: most rows one site may keep, fraction of k "
                            "(default: no cap)")
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
                       help="most rows one site may upload per round (default 0: its share "
                       "of the selection buffer)")
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
    group.add_argument("--log-format", choices=("text", "json"),
                       help="log lines as text (default) or one JSON object per line (time, "
                       "level, logger, message)")
    group = serve.add_argument_group("observability")
    group.add_argument("--metrics-port", type=int,
                       help="serve Prometheus metrics on http://METRICS_HOST:PORT/metrics "
                       "(default 0 = off)")
    group.add_argument("--metrics-host",
                       help="address of the metrics endpoint (default 127.0.0.1)")

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

    check = commands.add_parser(
        "health", help="ask a running server's gRPC health service (exit 0 when SERVING)",
        description="Call grpc.health.v1.Health/Check on a running fedserver and print its "
        "status. Exit status 0 when SERVING, 1 when NOT_SERVING (starting: the journal is being "
        "replayed; or draining after SIGTERM) or unreachable. The Docker HEALTHCHECK uses it.",
    )
    check.add_argument("--address",
                       help="HOST:PORT of the server (default: the bind address of --config or "
                       "$FEDSERVER_CONFIG / $FEDSERVER_BIND, with 0.0.0.0 read as 127.0.0.1)")
    check.add_argument("--config", type=Path, help="server.toml to take the address from")
    check.add_argument("--tls-ca", type=Path, help="PEM CA of the server certificate (TLS)")
    check.add_argument("--tls-server-name", help="name to check in the server certificate")
    check.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    check.add_argument("--wait", type=float, default=0.0,
                       help="keep asking for up to this many seconds until SERVING (default 0)")
    add_operator_commands(commands)
    return parser


_SERVE_KEYS = (
    "bind", "tls_cert", "tls_key", "client_ca", "tokens_file", "max_message_bytes",
    "max_workers", "max_rpcs_per_site", "max_exempt_streams_per_peer", "max_exempt_streams",
    "expected_sites", "quorum", "round_timeout_s", "rounds", "round_interval_s",
    "global_bank_size",
    "strategy", "server_selection", "floor_fraction", "max_site_share", "seed", "device",
    "buffer_rows", "codec", "byte_shuffle",
    "zstd_level", "max_chunk_bytes",
    "max_rows_per_site", "feature_fingerprint", "feature_dim", "state_dir", "grace_s",
    "log_level", "log_format", "metrics_port", "metrics_host",
)


def _init_config(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    config, tokens, site_dir = directory / "server.toml", directory / "tokens", directory / (
        "site-tokens"
    )
    existing = [p for p in (config, tokens) if p.exists()]
    if existing and not args.force:
        print(f"fedserver: {existing[0]} exists; use --force to overwrite", file=sys.stderr)
        return 2
    site_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    site_tokens = {site: new_token() for site in args.sites}
    operator_token = new_token()
    write_tokens_file(tokens, {**site_tokens, OPERATOR: operator_token})
    for site, token in site_tokens.items():
        path = site_dir / f"{site}.token"
        write_private(path, token + "\n")
    write_private(directory / OPERATOR_TOKEN_FILE, operator_token + "\n")
    config.write_text(example_config({
        "bind": args.bind, "state_dir": "state", "tokens_file": "tokens",
        "expected_sites": list(args.sites), "global_bank_size": args.global_bank_size,
    }), encoding="utf-8")
    print(f"wrote {config}, {tokens}, {len(site_tokens)} token(s) in {site_dir}/ and the "
          f"operator's token {directory / OPERATOR_TOKEN_FILE} (fedserver site/round commands)")
    print(f"start the server with: fedserver serve --config {config}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    # Imported here: the daemon imports torch, which `fedserver health` must not wait for.
    from fedserver.daemon import serve
    from fedserver.federation import StateMismatchError
    from fedserver.journal import JournalCorruptError

    overrides = {key: getattr(args, key) for key in _SERVE_KEYS}
    try:
        config = load_config(args.config, overrides, os.environ)
    except ConfigError as error:
        print(f"fedserver: configuration error: {error}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    try:
        return serve(config)
    except (ConfigError, AuthError, StateMismatchError) as error:
        print(f"fedserver: configuration error: {error}", file=sys.stderr)
        return 2
    except (JournalCorruptError, RuntimeError, OSError) as error:
        print(f"fedserver: cannot start: {error}", file=sys.stderr)
        return 1


def _health_address(args: argparse.Namespace) -> str:
    """--address, else the bind address of the configuration (flag > env > file)."""
    if args.address:
        return str(args.address)
    environ = os.environ
    if args.config is None and not environ.get(CONFIG_ENV):
        bind = environ.get("FEDSERVER_BIND", "127.0.0.1:50051")
    else:
        path = args.config or Path(environ[CONFIG_ENV])
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"cannot read config {path}: {error}") from error
        table = data.get("server", data)
        bind = environ.get("FEDSERVER_BIND") or str(table.get("bind", "127.0.0.1:50051"))
    host, _, port = bind.rpartition(":")
    if host in ("0.0.0.0", "[::]", "::", ""):
        host = "127.0.0.1"
    return f"{host}:{port}"


def _health(args: argparse.Namespace) -> int:
    try:
        address = _health_address(args)
    except ConfigError as error:
        print(f"fedserver: configuration error: {error}", file=sys.stderr)
        return 2
    status = check_health(
        address, timeout_s=args.timeout, wait_s=args.wait, tls_ca=args.tls_ca,
        tls_server_name=args.tls_server_name,
    )
    print(f"{address}: {status}")
    return 0 if status == "SERVING" else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "init-config":
        return _init_config(args)
    if args.command == "health":
        return _health(args)
    if args.command in ("site", "round", "operator-token"):
        return run_operator(args)
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
