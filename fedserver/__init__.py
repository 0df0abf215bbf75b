"""fedserver: the gRPC daemon over core.federated.GlobalBankAggregator.

`fedserver serve` runs it (fedserver.cli); `create_server` builds one in-process (tests, tools).
The rpc handlers (servicer) delegate to `Federation` (rounds, journal, bank versions), which
delegates aggregation to core.

The names below are imported on first use, so that light commands (`fedserver health`, the
Docker HEALTHCHECK, every 30 s) do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedserver.config import ServerConfig as ServerConfig
    from fedserver.config import load_config as load_config
    from fedserver.daemon import create_server as create_server
    from fedserver.federation import Federation as Federation

__all__ = ["Federation", "ServerConfig", "create_server", "load_config"]

_WHERE = {
    "Federation": "fedserver.federation",
    "ServerConfig": "fedserver.config",
    "create_server": "fedserver.daemon",
    "load_config": "fedserver.config",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'fedserver' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
