"""The fedserver round as a Flower ServerApp (flwr's Message API; extra ``flower``).

For federations that already run Flower: the SuperLink carries the messages, and this ServerApp
does what ``fedserver serve`` does with them, through the same code: it sends every site the
round's rules (the serialized ``fedpatchcore.v1.RoundConfig`` fedserver sends on JoinRound),
feeds each site's upload (``UploadFeaturesRequest`` messages: the summary, then the chunks its
codec encoded) to core's :class:`~core.federated.aggregator.GlobalBankAggregator` (prefix merge by
default), and sends the bank back as ``BankChunk`` messages under the same codec. Encoded messages
travel as bytes in the records (one :class:`flwr.app.Array` each), so the codecs and the
checksums still apply; Flower adds its own transport (protobuf over HTTP since flwr 1.40).

The settings are fedserver's: the run config's ``server-config`` names a ``server.toml`` as
``fedserver init-config`` writes it (global_bank_size, strategy, server_selection, seed, codec,
max_chunk_bytes, extractor, ...). The extractor must be pinned there: Flower sites have no
JoinRound reply to agree on one otherwise. What Flower does itself (transport, TLS, SuperNode
authentication) is not taken from that file: bind, tls_*, tokens_file, state_dir, quorum and
round_timeout_s are ignored. One round (the sites' local coresets -> the bank): novelty rounds
need the sites' coresets kept between runs, which ``fedclient run`` does and this app does not.

Run it (see README, "Flower")::

    flwr run flower-app <connection> -c "server-config='/path/server.toml' num-sites=3"
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from core.federated.aggregator import GlobalBankAggregator, RoundOutcome
from core.federated.communication import parse_upload
from core.messages import SiteSummary
from core.serde import bank_chunk_to_proto, codec_error, split_bank_into_chunks
from fedserver.config import ConfigError, ServerConfig, load_config
from fedserver.federation import RoundTerms
from fedserver.servicer import terms_to_proto

logger = logging.getLogger(__name__)

__all__ = [
    "BANK_KEY",
    "BANK_STYPE",
    "ROUND_CONFIG_KEY",
    "SITE_KEY",
    "UPLOAD_KEY",
    "UPLOAD_STYPE",
    "FlowerRoundError",
    "FlowerRunSettings",
    "aggregate_uploads",
    "app",
    "bank_messages",
    "messages_from_record",
    "messages_to_record",
    "round_config_message",
    "run_round",
]

#: Record keys of the messages (the contract between this app and fedclient.flower_app).
#: ConfigRecord {"round-config": bytes}: a serialized fedpatchcore.v1.RoundConfig.
ROUND_CONFIG_KEY: Final = "fedpatchcore.round-config"
#: ArrayRecord: the site's serialized UploadFeaturesRequest messages, in send order.
UPLOAD_KEY: Final = "fedpatchcore.upload"
#: ConfigRecord {"site-id": str}: who sent an upload.
SITE_KEY: Final = "fedpatchcore.site"
#: ArrayRecord: the bank's serialized BankChunk messages, in order.
BANK_KEY: Final = "fedpatchcore.bank"

UPLOAD_STYPE: Final = "fedpatchcore.v1.UploadFeaturesRequest"
BANK_STYPE: Final = "fedpatchcore.v1.BankChunk"
BANK_FILE: Final = "bank.safetensors"
ROUND_FILE: Final = "round.json"


class FlowerRoundError(RuntimeError):
    """The Flower round cannot go on: too few nodes, a site's error reply, a duplicate site."""


def messages_to_record(messages: Iterable[bytes], stype: str) -> ArrayRecord:
    """Serialized protobuf messages -> an ArrayRecord, one uint8 Array per message.

    Keys are zero-padded positions, so the record keeps the send order; ``stype`` names the
    message type (Flower leaves stype to the application for non-numpy data).
    """
    arrays = {
        f"{index:08d}": Array(dtype="uint8", shape=(len(data),), stype=stype, data=bytes(data))
        for index, data in enumerate(messages)
    }
    return ArrayRecord(arrays)


def messages_from_record(record: ArrayRecord, stype: str) -> list[bytes]:
    """The messages :func:`messages_to_record` packed, in order; ValueError for another kind
    of record (another stype, or keys that are not consecutive positions)."""
    keys = list(record.keys())
    if keys != [f"{index:08d}" for index in range(len(keys))]:
        raise ValueError(f"{stype} record: keys must be 00000000, 00000001, ...; got {keys[:3]}")
    messages = []
    for key in keys:
        array = record[key]
        if array.stype != stype:
            raise ValueError(f"record entry {key} holds {array.stype!r}, expected {stype!r}")
        messages.append(bytes(array.data))
    return messages


@dataclass(frozen=True)
class FlowerRunSettings:
    """The run config of the ServerApp (``[tool.flwr.app.config]`` / ``flwr run -c``).

    server: fedserver's settings (``server-config``: path of a server.toml).
    num_sites: SuperNodes the round waits for (``num-sites``); with ``expected_sites`` in the
        server config, the replies must come from exactly those site ids.
    out_dir: where the server writes ``bank.safetensors`` and ``round.json`` (``out-dir``;
        "" = nowhere).
    node_wait_s: longest wait for the SuperNodes to connect, seconds (``node-wait-s``).
    round_timeout_s: longest wait for the sites' uploads, and again for their bank receipts,
        seconds (``round-timeout-s``).
    """

    server: ServerConfig
    num_sites: int
    out_dir: Path | None = None
    node_wait_s: float = 120.0
    round_timeout_s: float = 3600.0

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FlowerRunSettings:
        """Validate the run config; ConfigError naming the key otherwise."""
        known = {"server-config", "num-sites", "out-dir", "node-wait-s", "round-timeout-s"}
        unknown = set(run_config) - known
        if unknown:
            raise ConfigError(
                f"unknown run config key(s) {sorted(unknown)}; known: {sorted(known)}"
            )
        path = run_config.get("server-config", "")
        if not isinstance(path, str) or not path:
            raise ConfigError("run config 'server-config' must name a fedserver server.toml")
        server = load_config(Path(path))
        if server.rounds != 1:
            raise ConfigError(
                f"{path}: rounds = {server.rounds}, but the Flower app runs one round (use "
                "`fedserver serve` for novelty rounds)"
            )
        if server.feature_config() is None:
            raise ConfigError(
                f"{path}: the Flower app needs the extractor pinned ([server.extractor]): its "
                "sites have no JoinRound reply to learn it from"
            )
        num_sites = run_config.get("num-sites")
        if not isinstance(num_sites, int) or isinstance(num_sites, bool) or num_sites < 1:
            raise ConfigError(f"run config 'num-sites' must be an int >= 1, got {num_sites!r}")
        if server.expected_sites and len(server.expected_sites) != num_sites:
            raise ConfigError(
                f"num-sites = {num_sites} but {path} expects {len(server.expected_sites)} "
                f"site(s): {list(server.expected_sites)}"
            )
        timeouts = {}
        for key, default in (("node-wait-s", 120.0), ("round-timeout-s", 3600.0)):
            value = run_config.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"run config {key!r} must be a number > 0, got {value!r}")
            timeouts[key] = float(value)
        out = run_config.get("out-dir", "")
        if not isinstance(out, str):
            raise ConfigError(f"run config 'out-dir' must be a path string, got {out!r}")
        return cls(
            server=server,
            num_sites=num_sites,
            out_dir=Path(out) if out else None,
            node_wait_s=timeouts["node-wait-s"],
            round_timeout_s=timeouts["round-timeout-s"],
        )


def round_config_message(server: ServerConfig, num_sites: int) -> bytes:
    """The serialized fedpatchcore.v1.RoundConfig of round 1: what fedserver's JoinRound says."""
    features = server.feature_config()
    assert features is not None  # FlowerRunSettings checked it
    extractor = {**features.to_dict(), "pretrained": features.pretrained}
    terms = RoundTerms(
        round=1,
        feature_fingerprint=features.fingerprint(),
        extractor=extractor,
        codec_name=server.codec,
        codec=server.codec_config,
        max_chunk_bytes=server.max_chunk_bytes,
        global_bank_size=server.global_bank_size,
        max_rows_per_site=server.max_rows_per_site,
        feature_dim=features.target_embed_dim,
        deadline=None,
        expected_sites=num_sites,
        quorum=num_sites,
        novelty_threshold=0.0,
        base_bank_version=0,
    )
    return terms_to_proto(terms).SerializeToString()


def _aggregator(server: ServerConfig) -> GlobalBankAggregator:
    return GlobalBankAggregator(
        server.global_bank_size,
        strategy=server.strategy,
        seed=server.seed,
        buffer_rows=server.buffer_rows,
        device=server.selection_device(),
        server_selection=server.server_selection,
        floor_fraction=server.floor_fraction,
        max_site_share=server.max_site_share,
    )


def aggregate_uploads(
    server: ServerConfig, uploads: Mapping[str, Sequence[bytes]]
) -> RoundOutcome:
    """Round 1 over the sites' upload messages (site id -> serialized UploadFeaturesRequest).

    The same aggregator fedserver's Federation and core's FederatedServer feed; each message is
    parsed and validated by core (typed errors for bad bytes, a wrong site id in a message, a
    short upload, ...). The aggregator sorts rows into canonical order, so the order of the
    sites does not change the bank.
    """
    aggregator = _aggregator(server)
    aggregator.begin_round(1)
    for site_id, messages in sorted(uploads.items()):
        for item in parse_upload(messages):
            if item.site_id != site_id:
                raise FlowerRoundError(
                    f"site {site_id!r} sent a message of site {item.site_id!r}"
                )
            if isinstance(item, SiteSummary):
                aggregator.receive_summary(item)
            else:
                aggregator.receive_chunk(item)
    return aggregator.finish_round(expected_sites=len(uploads))


def bank_messages(server: ServerConfig, outcome: RoundOutcome) -> tuple[list[bytes], float]:
    """The bank as serialized BankChunk messages under the server's codec, and r_S for the bank
    as the sites decode it (the selector's r_S plus the bank's codec error, as
    core.federated.FederatedServer reports it)."""
    codec = server.codec_config
    bank_error = codec_error(outcome.bank, config=codec, max_chunk_bytes=server.max_chunk_bytes)
    server_radius = outcome.server_radius + bank_error
    chunks = split_bank_into_chunks(
        outcome.bank,
        config=codec,
        round=outcome.round,
        server_coverage_radius=server_radius,
        max_site_coverage_radius=outcome.max_site_radius,
        max_chunk_bytes=server.max_chunk_bytes,
    )
    return [bank_chunk_to_proto(chunk).SerializeToString() for chunk in chunks], server_radius


def _wait_for_nodes(grid: Grid, count: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes[:count]
        if time.monotonic() > deadline:
            raise FlowerRoundError(
                f"{len(nodes)} SuperNode(s) connected after {timeout_s:.0f} s, {count} needed"
            )
        time.sleep(0.5)


def _replies(
    grid: Grid, nodes: Sequence[int], content: RecordDict, kind: str, timeout_s: float
) -> list[Message]:
    messages = [
        Message(content=content, dst_node_id=node, message_type=kind) for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout_s))
    errors = [
        f"node {r.metadata.src_node_id}: {r.error.reason}" for r in replies if r.has_error()
    ]
    if errors:
        raise FlowerRoundError(f"{kind}: site error(s): {'; '.join(errors)}")
    if len(replies) != len(nodes):
        raise FlowerRoundError(
            f"{kind}: {len(replies)} of {len(nodes)} site(s) replied within {timeout_s:.0f} s"
        )
    return replies


def run_round(grid: Grid, settings: FlowerRunSettings) -> dict[str, Any]:
    """Round 1 over ``grid``: rules out, uploads in, bank out, receipts in. Returns the round
    summary it also writes to ``out_dir/round.json``."""
    server = settings.server
    nodes = _wait_for_nodes(grid, settings.num_sites, settings.node_wait_s)
    logger.info("flower round 1: %d site(s) on nodes %s", len(nodes), nodes)
    rules = ConfigRecord({"round-config": round_config_message(server, len(nodes))})
    t0 = time.perf_counter()
    replies = _replies(
        grid, nodes, RecordDict({ROUND_CONFIG_KEY: rules}), MessageType.TRAIN,
        settings.round_timeout_s,
    )
    uploads: dict[str, list[bytes]] = {}
    for reply in replies:
        site_id = str(reply.content[SITE_KEY]["site-id"])
        if site_id in uploads:
            raise FlowerRoundError(f"two SuperNodes run site {site_id!r}")
        uploads[site_id] = messages_from_record(reply.content[UPLOAD_KEY], UPLOAD_STYPE)
    if server.expected_sites and set(uploads) != set(server.expected_sites):
        raise FlowerRoundError(
            f"sites {sorted(uploads)} replied; the server config expects "
            f"{sorted(server.expected_sites)}"
        )
    upload_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    outcome = aggregate_uploads(server, uploads)
    selection_seconds = time.perf_counter() - t0
    messages, server_radius = bank_messages(server, outcome)
    t0 = time.perf_counter()
    receipts = _replies(
        grid, nodes,
        RecordDict({BANK_KEY: messages_to_record(messages, BANK_STYPE), ROUND_CONFIG_KEY: rules}),
        MessageType.EVALUATE, settings.round_timeout_s,
    )
    summary: dict[str, Any] = {
        "round": outcome.round,
        "sites": sorted(uploads),
        "bank_rows": int(outcome.bank.shape[0]),
        "rows_up": {s: int(n) for s, n in outcome.rows_received.items()},
        "bytes_up": {s: sum(len(m) for m in msgs) for s, msgs in uploads.items()},
        "bytes_down_per_site": sum(len(m) for m in messages),
        "server_coverage_radius": server_radius,
        "max_site_coverage_radius": outcome.max_site_radius,
        "certificate": server_radius + outcome.max_site_radius,
        "allocation": [a.as_dict() for a in outcome.allocation],
        "flooding": dict(outcome.flooding),
        "site_metrics": {
            str(r.content[SITE_KEY]["site-id"]): dict(r.content["metrics"]) for r in receipts
        },
        "seconds": {
            "upload": upload_seconds,
            "selection": selection_seconds,
            "download": time.perf_counter() - t0,
        },
    }
    logger.info(
        "flower round 1: bank %d rows from %s; r_S %.4f, certificate %.4f",
        summary["bank_rows"], summary["sites"], server_radius, summary["certificate"],
    )
    if settings.out_dir is not None:
        _write_outputs(settings.out_dir, outcome, summary)
    return summary


def _write_outputs(out_dir: Path, outcome: RoundOutcome, summary: Mapping[str, Any]) -> None:
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    bank = np.ascontiguousarray(outcome.bank, dtype=np.float32)
    save_file({"memory_bank": bank}, str(out_dir / BANK_FILE))
    (out_dir / ROUND_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls in the ServerApp process (``flwr run``)."""
    run_round(grid, FlowerRunSettings.from_run_config(context.run_config))
