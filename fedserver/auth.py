"""Per-site bearer tokens: the hashed tokens file and the gRPC server interceptor.

Every rpc except the health and reflection services carries ``authorization: Bearer <token>``.
The server stores only SHA-256 digests of the tokens (one line per site: ``site_id <64 hex>``),
so a leaked state or config directory does not leak credentials. A plain hash suffices, unlike
for passwords: tokens are 32 random bytes (``new_token``), too many to guess, so a slow KDF
would add latency to every rpc and no security. The digest of a presented token is compared
with every stored digest by ``hmac.compare_digest``, all of them every time, so the time taken
says nothing about which site, or how much of a digest, matched.

The operator's token (fedserver.operator) sits in the same file under the reserved id
``@operator`` (site ids may not start with "@"): the interceptor lets it call the operator
service only, and site tokens every service but that one (PERMISSION_DENIED otherwise). The
operator adds and revokes sites while the server runs: the file is rewritten atomically
(``write_private``) and the in-memory store swapped (:meth:`TokenStore.swap`), no restart.

The server's interceptor (fedserver.access) authenticates (UNAUTHENTICATED when the token is
missing or unknown); the servicer authorises: it asks ``TokenStore.site_of`` for the caller's
site and refuses a request that names another site (PERMISSION_DENIED), so a site uploads and
queries only as itself.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

from core.messages import MAX_SITE_ID_BYTES
from fedserver.journal import write_private

logger = logging.getLogger(__name__)

__all__ = [
    "EXEMPT_METHOD_PREFIXES",
    "OPERATOR",
    "AuthError",
    "TokenStore",
    "hash_token",
    "new_token",
    "write_tokens_file",
]

#: Services callable without a token: load balancers and grpcurl must see health and the schema.
EXEMPT_METHOD_PREFIXES: Final[tuple[str, ...]] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
_BEARER: Final[str] = "bearer "
#: The tokens file's id of the operator's token (fedserver.operator).
OPERATOR: Final[str] = "@operator"
_HEADER_LINE: Final[str] = "# fedserver tokens: site_id sha256(token) (see fedserver/auth.py)"


class AuthError(ValueError):
    """A tokens file line is malformed, or a token is missing/unknown (the message says which)."""


def new_token() -> str:
    """A fresh token: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """SHA-256 hex digest of a token (what the tokens file stores)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def write_tokens_file(path: Path, site_tokens: dict[str, str]) -> None:
    """Write ``site_id sha256`` lines for {site_id: plaintext token} (``OPERATOR`` included);
    the file is mode 0600."""
    write_digests(path, [(site, hash_token(token)) for site, token in site_tokens.items()])


def write_digests(path: Path, entries: Iterable[tuple[str, str]]) -> None:
    """Write (site_id, sha256 hex) pairs as a tokens file, atomically and durably (mode 0600)."""
    lines = [_HEADER_LINE] + [f"{site} {digest}" for site, digest in sorted(entries)]
    write_private(path, "\n".join(lines) + "\n")


def check_site_id(site: str) -> None:
    """AuthError unless ``site`` can be a site id (1..256 bytes, no whitespace, not "@...")."""
    if not site or len(site.encode("utf-8")) > MAX_SITE_ID_BYTES:
        raise AuthError(f"site id {site!r} must be 1..{MAX_SITE_ID_BYTES} bytes")
    if any(c.isspace() for c in site) or "#" in site:
        raise AuthError(f"site id {site!r} may not contain whitespace or '#'")
    if site.startswith("@"):
        raise AuthError(f"site id {site!r} may not start with '@' (reserved: {OPERATOR})")


class TokenStore:
    """The hashed tokens of the federation's sites (immutable after loading).

    Args:
        entries: (site_id, sha256 hex digest) pairs; site ids and digests must be unique.
    """

    def __init__(self, entries: Iterable[tuple[str, str]]) -> None:
        sites: list[str] = []
        digests: list[bytes] = []
        for site, digest in entries:
            if not site or len(site.encode("utf-8")) > MAX_SITE_ID_BYTES:
                raise AuthError(f"site id {site!r} must be 1..{MAX_SITE_ID_BYTES} bytes")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise AuthError(f"site {site!r}: the digest must be 64 lowercase hex characters")
            if site in sites:
                raise AuthError(f"site {site!r} appears twice in the tokens file")
            if bytes.fromhex(digest) in digests:
                raise AuthError(f"site {site!r} shares its token with another site")
            sites.append(site)
            digests.append(bytes.fromhex(digest))
        if not sites:
            raise AuthError("the tokens file names no site")
        self._entries: tuple[tuple[str, bytes], ...] = tuple(zip(sites, digests, strict=True))

    def swap(self, other: TokenStore) -> None:
        """Take ``other``'s entries (an operator added or revoked a site). One attribute
        assignment: an rpc being authenticated sees the old entries or the new ones."""
        self._entries = other._entries

    def digests(self) -> list[tuple[str, str]]:
        """(site id, sha256 hex) of every entry, the operator's included (to rewrite the file)."""
        return [(site, digest.hex()) for site, digest in self._entries]

    @property
    def has_operator(self) -> bool:
        return any(site == OPERATOR for site, _ in self._entries)

    @classmethod
    def load(cls, path: Path) -> TokenStore:
        """Read a tokens file: ``site_id <sha256 hex>`` per line, ``#`` comments, blank lines."""
        entries = []
        for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise AuthError(
                    f"{path}:{number}: expected 'site_id sha256-hex', got {len(parts)} field(s)"
                )
            entries.append((parts[0], parts[1]))
        try:
            return cls(entries)
        except AuthError as error:
            raise AuthError(f"{path}: {error}") from error

    @property
    def sites(self) -> tuple[str, ...]:
        """The site ids, in file order (the operator is not a site)."""
        return tuple(site for site, _ in self._entries if site != OPERATOR)

    def site_for_token(self, token: str) -> str | None:
        """The site whose token this is, or None. Constant time in the token's content."""
        presented = hashlib.sha256(token.encode("utf-8")).digest()
        found: str | None = None
        for site, digest in self._entries:  # no early exit: same work whichever entry matches
            if hmac.compare_digest(presented, digest):
                found = site
        return found

    def site_of(self, metadata: Sequence[tuple[str, Any]] | None) -> str:
        """The authenticated site of an rpc's invocation metadata; AuthError if none."""
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            raise AuthError("missing 'authorization: Bearer <token>' metadata")
        if len(values) > 1:
            raise AuthError("more than one 'authorization' metadata entry")
        value = values[0] if isinstance(values[0], str) else values[0].decode("utf-8", "replace")
        if not value.lower().startswith(_BEARER):
            raise AuthError("the authorization metadata must be 'Bearer <token>'")
        site = self.site_for_token(value[len(_BEARER):].strip())
        if site is None:
            raise AuthError("unknown bearer token")
        return site
