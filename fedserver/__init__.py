"""fedserver: the gRPC daemon over core.federated.GlobalBankAggregator.

`fedserver serve` runs it (fedserver.cli); `create_server` builds one in-process (tests, tools).
The rpc handlers (servicer) delegate to `Federation` (rounds, journal, bank versions), which
delegates aggregation to core.
"""

from fedserver.config import ServerConfig as ServerConfig
from fedserver.config import load_config as load_config
from fedserver.daemon import create_server as create_server
from fedserver.federation import Federation as Federation

__all__ = ["Federation", "ServerConfig", "create_server", "load_config"]
