"""Domain errors of the daemon; the servicer maps each to a gRPC status code (STATUS_BY_ERROR).

Every error's message says what was wrong and, where there is one, what to do instead.
"""

from __future__ import annotations

__all__ = [
    "AlreadyExistsError",
    "BankNotReadyError",
    "BusyError",
    "DimensionMismatchError",
    "FederationError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "RoundClosedError",
    "StateMismatchError",
    "StorageError",
    "UploadLimitError",
]


class FederationError(Exception):
    """Base of the errors the servicer maps to status codes (each names what was wrong)."""


class PermissionDeniedError(FederationError):
    """The caller's site may not do this (another site's upload, a site not in the round)."""


class NotFoundError(FederationError):
    """A round or bank version the server has no record of."""


class OutOfRangeError(FederationError):
    """A chunk beyond the committed position: the client must resume from it."""


class RoundClosedError(FederationError):
    """The round does not accept this now (closed, selecting, failed, or not this round)."""


class BankNotReadyError(FederationError):
    """No bank version exists yet."""


class DimensionMismatchError(FederationError):
    """A summary's feature dimension differs from the federation's."""


class UploadLimitError(FederationError):
    """An upload larger than the server accepts from one site (RESOURCE_EXHAUSTED)."""


class StateMismatchError(FederationError):
    """The state directory was created with other selection settings than the config's."""


class StorageError(FederationError):
    """The server could not make a message durable; it was not acknowledged."""


class BusyError(FederationError):
    """The server is briefly not accepting this (a withdrawal is rewriting the journal): retry
    (UNAVAILABLE, which fedclient retries with backoff)."""


class AlreadyExistsError(FederationError):
    """An operator asked to create what exists (a site that holds a token)."""
