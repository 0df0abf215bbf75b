"""The operator service (protos/fedpatchcore/v1/operator.proto): membership and rounds of a
running server, without a restart or a hand-edited file.

Only the operator's token may call it (fedserver.access routes it; fedserver.auth stores the
token under ``@operator``). Each rpc is a thin adapter: the federation does the work
(Federation.add_site / revoke_site / open_round, fedserver.membership for withdrawals) and
journals it; this module keeps the tokens file in step (rewritten atomically with
``write_private``, the in-memory TokenStore swapped) and turns results into messages.

Order of effects: AddSite journals the site first, then writes its token (a token never exists
for a site the federation would not expect); RevokeSite and WithdrawSite change the federation
first, then remove the token, so a refused command (a round selecting, a partial upload)
changes nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from google.protobuf import message_factory

from core.serde import bank_chunk_to_proto
from fedpatchcore.v1 import federation_pb2 as fpb
from fedpatchcore.v1 import operator_pb2 as opb
from fedserver.auth import (
    AuthError,
    TokenStore,
    check_site_id,
    hash_token,
    new_token,
    write_digests,
)
from fedserver.errors import AlreadyExistsError, NotFoundError
from fedserver.federation import BankDownload, Federation
from fedserver.membership import Withdrawal
from fedserver.servicer import (
    _HANDLER_KINDS,
    AttachedServicer,
    _header_responses,
    _statuses,
    _tolerant,
    check_parsed,
)

logger = logging.getLogger(__name__)

__all__ = ["OPERATOR_SERVICE", "OperatorServicer", "add_operator_to_server", "stream_bytes"]

OPERATOR_SERVICE = opb.DESCRIPTOR.services_by_name["OperatorService"]


def stream_bytes(download: BankDownload) -> int:
    """Serialized bytes of the DownloadBank reply that sends ``download`` (what the servicer
    sends and counts): header, removed indices, chunks."""
    total = sum(response.ByteSize() for response in _header_responses(download))
    for chunk in download.chunks:
        total += fpb.DownloadBankResponse(chunk=bank_chunk_to_proto(chunk)).ByteSize()
    return total


class OperatorServicer(AttachedServicer):
    """OperatorService's asyncio handlers (module docstring).

    Args:
        tokens: the server's token store (swapped in place when sites are added or revoked).
        tokens_file: where it lives (rewritten atomically).
        executor: runs the blocking federation calls off the event loop.
    """

    def __init__(self, tokens: TokenStore, tokens_file: Path, *, executor: Executor) -> None:
        self._tokens = tokens
        self._tokens_file = Path(tokens_file)
        self._executor = executor
        self._attached: Federation | None = None
        self._file_lock = threading.Lock()  # one rewrite of the tokens file at a time

    # -- the tokens file ------------------------------------------------------------------

    def _set_tokens(self, change: Callable[[list[tuple[str, str]]], list[tuple[str, str]]]
                    ) -> None:
        with self._file_lock:
            entries = change(self._tokens.digests())
            updated = TokenStore(entries)  # validates before anything is written
            write_digests(self._tokens_file, entries)
            self._tokens.swap(updated)

    # -- rpcs -------------------------------------------------------------------------------

    async def AddSite(  # noqa: N802
        self, request: opb.AddSiteRequest, context: grpc.aio.ServicerContext
    ) -> opb.AddSiteResponse:
        async with _statuses(context, "AddSite", "operator"):
            check_parsed(request)
            return await self._run(self._add_site, request.site_id)

    def _add_site(self, site: str) -> opb.AddSiteResponse:
        try:
            check_site_id(site)
        except AuthError as error:
            raise ValueError(str(error)) from None
        if site in self._tokens.sites:
            raise AlreadyExistsError(f"site {site!r} already holds a token (revoke it first to "
                                     "give it a new one)")
        joins = self._federation.add_site(site)
        token = new_token()
        self._set_tokens(lambda entries: [*entries, (site, hash_token(token))])
        logger.info("operator: site %s added (joins round %d)", site, joins)
        return opb.AddSiteResponse(site_id=site, token=token, joins_round=joins)

    async def RevokeSite(  # noqa: N802
        self, request: opb.RevokeSiteRequest, context: grpc.aio.ServicerContext
    ) -> opb.RevokeSiteResponse:
        async with _statuses(context, "RevokeSite", "operator"):
            check_parsed(request)
            return await self._run(self._revoke_site, request.site_id)

    def _revoke_site(self, site: str) -> opb.RevokeSiteResponse:
        if site not in self._tokens.sites:
            raise NotFoundError(f"site {site!r} holds no token")
        message = self._federation.revoke_site(site)
        self._remove_token(site)
        return opb.RevokeSiteResponse(site_id=site, message=message)

    def _remove_token(self, site: str) -> None:
        if site in self._tokens.sites:
            self._set_tokens(lambda entries: [e for e in entries if e[0] != site])
            logger.info("operator: token of site %s revoked", site)

    async def WithdrawSite(  # noqa: N802
        self, request: opb.WithdrawSiteRequest, context: grpc.aio.ServicerContext
    ) -> opb.WithdrawSiteResponse:
        async with _statuses(context, "WithdrawSite", "operator"):
            check_parsed(request)
            return await self._run(self._withdraw_site, request.site_id)

    def _withdraw_site(self, site: str) -> opb.WithdrawSiteResponse:
        federation = self._federation
        done = federation.withdraw_site(site)
        self._remove_token(site)
        deltas = self._deltas(federation, done)
        federation.note_withdrawal_deltas(done, [
            {"site_id": d.site_id, "have_version": d.have_version, "delta_bytes": d.delta_bytes,
             "full_bytes": d.full_bytes, "rows_removed": d.rows_removed,
             "rows_added": d.rows_added} for d in deltas
        ])
        for d in deltas:
            logger.info("withdrawal of %s: site %s downloads %d B (delta from v%d: %d rows "
                        "removed, %d added; a full download is %d B)", site, d.site_id,
                        d.delta_bytes, d.have_version, d.rows_removed, d.rows_added,
                        d.full_bytes)
        return opb.WithdrawSiteResponse(
            site_id=site,
            rows_removed_from_journal=done.rows_from_journal,
            rows_removed_from_bank=done.rows_from_bank,
            bank_version_before=done.version_before,
            bank_version_after=done.version_after,
            versions_deleted=list(done.deleted),
            versions_redacted=list(done.redacted),
            journal_bytes_before=done.journal_bytes_before,
            journal_bytes_after=done.journal_bytes_after,
            deltas=deltas,
            message=(f"site {site!r} withdrawn: bank v{done.version_before} -> "
                     f"v{done.version_after}"),
        )

    def _deltas(self, federation: Federation, done: Withdrawal) -> list[opb.SiteDelta]:
        """What each remaining site (holding a token, with a completed upload: it holds a
        bank) downloads to take the new bank, from the version the sites hold (the bank
        before the withdrawal)."""
        if done.version_after == done.version_before or not done.version_before:
            return []
        took_part = {s for s, (_, rounds) in federation.membership()["sites"].items() if rounds}
        delta = federation.preview_download(done.version_after, done.version_before)
        full = federation.preview_download(done.version_after, 0)
        delta_bytes, full_bytes = stream_bytes(delta), stream_bytes(full)
        return [
            opb.SiteDelta(site_id=site, have_version=done.version_before,
                          delta_bytes=delta_bytes, full_bytes=full_bytes,
                          rows_removed=delta.header.rows_removed,
                          rows_added=delta.header.rows_in_stream)
            for site in sorted(set(self._tokens.sites) & took_part)
        ]

    async def OpenRound(  # noqa: N802
        self, request: opb.OpenRoundRequest, context: grpc.aio.ServicerContext
    ) -> opb.OpenRoundResponse:
        async with _statuses(context, "OpenRound", "operator"):
            check_parsed(request)
            federation = self._federation
            snapshot = await self._run(federation.open_round)
            expected = federation.expected_sites(snapshot.round)
            return opb.OpenRoundResponse(round=snapshot.round, expected_sites=list(expected))

    async def ListSites(  # noqa: N802
        self, request: opb.ListSitesRequest, context: grpc.aio.ServicerContext
    ) -> opb.ListSitesResponse:
        async with _statuses(context, "ListSites", "operator"):
            check_parsed(request)
            state: dict[str, Any] = self._federation.membership()
            sites = dict(state["sites"])
            for site in self._tokens.sites:
                sites.setdefault(site, ("active", []))
            entries = [opb.SiteEntry(site_id=s, state=st, rounds=r)
                       for s, (st, r) in sorted(sites.items())]
            return opb.ListSitesResponse(sites=entries, current_round=state["round"],
                                         phase=state["phase"],
                                         bank_version=state["bank_version"])


def add_operator_to_server(servicer: OperatorServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` (handler table from the service descriptor, tolerant
    deserializers: undecodable bytes are INVALID_ARGUMENT, as for FederationService)."""
    handlers = {}
    for method in OPERATOR_SERVICE.methods:
        kind = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=_tolerant(message_factory.GetMessageClass(method.input_type)),
            response_serializer=message_factory.GetMessageClass(
                method.output_type
            ).SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(OPERATOR_SERVICE.full_name, handlers),)
    )
