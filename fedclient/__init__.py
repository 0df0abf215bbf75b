"""fedclient: the site side of FedPatchCore over gRPC (``fedclient run | score | status | check``).

Thin adapters over core: ``session`` (one site's conversation with fedserver: join, resumable
upload, delta bank download, watch; the only place that retries), ``site`` (fit, rounds, scoring,
the site's output folder), ``report`` (metrics.json, anomaly-map overlays), ``cli``.
"""

import os as _os

# gRPC's C core logs every failed TLS handshake at INFO on stderr ("I1207 ...
# ssl_transport_security.cc ..."), once per reconnection attempt, around the one line the CLI
# prints. It reads this variable when grpc is first imported, so it is set here, before any
# fedclient module imports grpc; a value the user set is kept.
_os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
