"""`fedserver site ... | round open | operator-token`: the operator's commands to a running server.

    fedserver site add plant-4 --token-out plant-4.token   # joins at the next round
    fedserver site list
    fedserver site revoke plant-2        # token revoked; its uploads stay in the bank
    fedserver site withdraw plant-3      # token revoked, its rows removed, bank reselected
    fedserver round open                 # open the next round now
    fedserver operator-token --config fed/server.toml   # (re)create the operator's token

Every command but operator-token talks to the server named by --address (or the bind address of
--config, as `fedserver health` reads it) with the operator's token: --token-file, else
$FEDSERVER_OPERATOR_TOKEN (the token itself), else operator.token next to --config. --json
prints the reply as JSON (scripts, tests). Exit status: 0 done, 1 refused by the server (the
status and message are printed on stderr), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from fedserver.auth import OPERATOR, AuthError, TokenStore, hash_token, new_token, write_digests
from fedserver.journal import write_private

__all__ = ["OPERATOR_TOKEN_ENV", "OPERATOR_TOKEN_FILE", "add_operator_commands", "run_operator"]

#: The operator token's file next to server.toml (written by init-config / operator-token).
OPERATOR_TOKEN_FILE = "operator.token"
OPERATOR_TOKEN_ENV = "FEDSERVER_OPERATOR_TOKEN"


def _connection_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument("--address", help="HOST:PORT of the server (default: the bind address of "
                       "--config / $FEDSERVER_CONFIG / $FEDSERVER_BIND)")
    group.add_argument("--config", type=Path, help="server.toml (address, and operator.token "
                       "next to it)")
    group.add_argument("--token-file", type=Path,
                       help=f"file holding the operator token (default: ${OPERATOR_TOKEN_ENV}, "
                       f"else {OPERATOR_TOKEN_FILE} next to --config)")
    group.add_argument("--tls-ca", type=Path, help="PEM CA of the server certificate (TLS)")
    group.add_argument("--tls-cert", type=Path, help="client certificate (mTLS)")
    group.add_argument("--tls-key", type=Path, help="client key (mTLS)")
    group.add_argument("--tls-server-name", help="name to check in the server certificate")
    group.add_argument("--timeout", type=float, default=600.0,
                       help="seconds to wait for the reply (default 600: a withdrawal "
                       "reselects the bank)")
    group.add_argument("--json", action="store_true", help="print the reply as JSON")


def add_operator_commands(commands: Any) -> None:
    """Add `site`, `round` and `operator-token` to fedserver's subcommands."""
    site = commands.add_parser(
        "site", help="add, revoke, withdraw or list sites of a running server",
        description="Membership of a running federation, without a restart (docs/operator.md).",
    )
    actions = site.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="give a new site a token; it joins at the next round")
    add.add_argument("site_id")
    add.add_argument("--token-out", type=Path,
                     help="write the token to this file (mode 0600) instead of printing it")
    revoke = actions.add_parser(
        "revoke", help="revoke a site's token; later rounds do not expect it (its rows stay)")
    revoke.add_argument("site_id")
    withdraw = actions.add_parser(
        "withdraw", help="revoke a site and remove its rows: journal, banks, reselected bank")
    withdraw.add_argument("site_id")
    listing = actions.add_parser("list", help="the sites, their state and the current round")
    for parser in (add, revoke, withdraw, listing):
        _connection_arguments(parser)

    rounds = commands.add_parser("round", help="open the next round of a running server")
    round_actions = rounds.add_subparsers(dest="action", required=True)
    opening = round_actions.add_parser("open", help="open the next round now (the current one "
                                       "must be ready)")
    _connection_arguments(opening)

    token = commands.add_parser(
        "operator-token", help="create (or replace) the operator's token in the tokens file",
        description="Write a new operator token: its SHA-256 into the tokens file (under "
        f"{OPERATOR}), the token itself into --out (default {OPERATOR_TOKEN_FILE} next to "
        "--config). A running server reads the tokens file at start: restart it once after "
        "this (later site changes go through the running server).",
    )
    token.add_argument("--config", type=Path, help="server.toml naming the tokens file")
    token.add_argument("--tokens-file", type=Path, help="the tokens file (default: the "
                       "config's tokens_file)")
    token.add_argument("--out", type=Path, help="where to write the token (mode 0600)")


def _address(args: argparse.Namespace) -> str:
    from fedserver.cli import _health_address

    return _health_address(args)


def _token(args: argparse.Namespace) -> str:
    if args.token_file is not None:
        return args.token_file.read_text(encoding="utf-8").strip()
    if os.environ.get(OPERATOR_TOKEN_ENV):
        return os.environ[OPERATOR_TOKEN_ENV].strip()
    config = args.config or (Path(os.environ["FEDSERVER_CONFIG"])
                             if os.environ.get("FEDSERVER_CONFIG") else None)
    if config is not None and (config.parent / OPERATOR_TOKEN_FILE).is_file():
        return (config.parent / OPERATOR_TOKEN_FILE).read_text(encoding="utf-8").strip()
    raise AuthError(f"no operator token: give --token-file, set ${OPERATOR_TOKEN_ENV}, or "
                    f"--config with {OPERATOR_TOKEN_FILE} next to it")


def _channel(args: argparse.Namespace, address: str) -> grpc.Channel:
    if args.tls_ca is None:
        return grpc.insecure_channel(address)
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if (
        args.tls_server_name) else []
    credentials = grpc.ssl_channel_credentials(
        args.tls_ca.read_bytes(),
        private_key=args.tls_key.read_bytes() if args.tls_key else None,
        certificate_chain=args.tls_cert.read_bytes() if args.tls_cert else None,
    )
    return grpc.secure_channel(address, credentials, options=options)


def _call(args: argparse.Namespace) -> Any:
    from fedpatchcore.v1 import operator_pb2 as opb
    from fedpatchcore.v1 import operator_pb2_grpc as opb_grpc

    address, token = _address(args), _token(args)
    metadata = (("authorization", f"Bearer {token}"),)
    with _channel(args, address) as channel:
        stub = opb_grpc.OperatorServiceStub(channel)
        kwargs = {"metadata": metadata, "timeout": args.timeout}
        if args.command == "round":
            return stub.OpenRound(opb.OpenRoundRequest(), **kwargs)
        if args.action == "add":
            return stub.AddSite(opb.AddSiteRequest(site_id=args.site_id), **kwargs)
        if args.action == "revoke":
            return stub.RevokeSite(opb.RevokeSiteRequest(site_id=args.site_id), **kwargs)
        if args.action == "withdraw":
            return stub.WithdrawSite(opb.WithdrawSiteRequest(site_id=args.site_id), **kwargs)
        return stub.ListSites(opb.ListSitesRequest(), **kwargs)


def _describe(args: argparse.Namespace, reply: Any) -> str:
    """The reply as lines for a person."""
    if args.command == "round":
        return f"round {reply.round} opened: expecting {', '.join(reply.expected_sites)}"
    if args.action == "add":
        where = (f"token written to {args.token_out}" if args.token_out else
                 f"token (shown once): {reply.token}")
        return (f"site {reply.site_id} added: it takes part from round {reply.joins_round}, "
                f"uploading its full coreset; {where}")
    if args.action == "revoke":
        return reply.message
    if args.action == "withdraw":
        lines = [
            f"site {reply.site_id} withdrawn: {reply.rows_removed_from_journal} uploaded rows "
            f"removed from the journal ({reply.journal_bytes_before:,} -> "
            f"{reply.journal_bytes_after:,} B), {reply.rows_removed_from_bank} from the bank",
            f"bank v{reply.bank_version_before} -> v{reply.bank_version_after}; versions "
            f"deleted {list(reply.versions_deleted)}, rewritten without its rows "
            f"{list(reply.versions_redacted)}",
        ]
        for delta in reply.deltas:
            lines.append(
                f"  {delta.site_id}: delta from v{delta.have_version} {delta.delta_bytes:,} B "
                f"({delta.rows_removed} rows removed, {delta.rows_added} added; full download "
                f"{delta.full_bytes:,} B)"
            )
        return "\n".join(lines)
    lines = [f"round {reply.current_round} ({reply.phase}), bank v{reply.bank_version}"]
    for entry in reply.sites:
        rounds = ",".join(str(r) for r in entry.rounds) or "-"
        lines.append(f"  {entry.site_id:<24} {entry.state:<10} rounds {rounds}")
    return "\n".join(lines)


def run_operator(args: argparse.Namespace) -> int:
    """Run `fedserver site|round|operator-token` (module docstring); the exit status."""
    if args.command == "operator-token":
        return _operator_token(args)
    try:
        reply = _call(args)
    except grpc.RpcError as error:
        code = error.code().name  # type: ignore[attr-defined]
        print(f"fedserver: {code}: {error.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    except (AuthError, OSError, ValueError) as error:
        print(f"fedserver: {error}", file=sys.stderr)
        return 2
    if args.command == "site" and args.action == "add" and args.token_out is not None:
        write_private(args.token_out, reply.token + "\n")
    if args.json:
        print(json.dumps(json_format.MessageToDict(
            reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        ), sort_keys=True))
    else:
        print(_describe(args, reply))
    return 0


def _operator_token(args: argparse.Namespace) -> int:
    from fedserver.config import ConfigError, load_config

    tokens_file: Path | None = args.tokens_file
    if tokens_file is None:
        if args.config is None:
            print("fedserver: give --config or --tokens-file", file=sys.stderr)
            return 2
        try:
            tokens_file = load_config(args.config, {}, os.environ).tokens_file
        except ConfigError as error:
            print(f"fedserver: configuration error: {error}", file=sys.stderr)
            return 2
    out = args.out or (args.config.parent if args.config else tokens_file.parent) / (
        OPERATOR_TOKEN_FILE)
    try:
        store = TokenStore.load(tokens_file)
    except (AuthError, OSError) as error:
        print(f"fedserver: {error}", file=sys.stderr)
        return 2
    token = new_token()
    entries = [e for e in store.digests() if e[0] != OPERATOR] + [(OPERATOR, hash_token(token))]
    write_private(out, token + "\n")
    write_digests(tokens_file, entries)
    print(f"wrote the operator token to {out} and its SHA-256 to {tokens_file}; restart a "
          "running server once to load it")
    return 0
