"""The spec's in-process federated API (src/federated/ in federated-api.md).

Sites (``PatchCoreClient``) build local coresets; ``FederatedServer`` aggregates them through
``GlobalBankAggregator`` (shared with the gRPC daemon); ``CommunicationProtocol`` carries the
exact wire messages and counts their bytes.
"""

from core.federated.aggregator import GlobalBankAggregator as GlobalBankAggregator
from core.federated.aggregator import RoundOutcome as RoundOutcome
from core.federated.client import PatchCoreClient as PatchCoreClient
from core.federated.communication import CommunicationProtocol as CommunicationProtocol
from core.federated.federated_patchcore import FederatedPatchCore as FederatedPatchCore
from core.federated.server import FederatedServer as FederatedServer
from core.federated.server import RoundReport as RoundReport
from core.federated.strategies import (
    federated_coreset_aggregation as federated_coreset_aggregation,
)
from core.federated.strategies import (
    federated_prefix_aggregation as federated_prefix_aggregation,
)
from core.federated.strategies import (
    federated_random_aggregation as federated_random_aggregation,
)
from core.federated.strategies import federated_weighted_union as federated_weighted_union
from core.federated.upload import UPLOAD_FACTOR as UPLOAD_FACTOR
from core.federated.upload import UploadBudget as UploadBudget
from core.federated.upload import short_bank_note as short_bank_note

__all__ = [
    "UPLOAD_FACTOR",
    "CommunicationProtocol",
    "FederatedPatchCore",
    "FederatedServer",
    "GlobalBankAggregator",
    "PatchCoreClient",
    "RoundOutcome",
    "RoundReport",
    "UploadBudget",
    "federated_coreset_aggregation",
    "federated_prefix_aggregation",
    "federated_random_aggregation",
    "federated_weighted_union",
    "short_bank_note",
]
