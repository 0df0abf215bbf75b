"""fedclient: the site side of FedPatchCore over gRPC (``fedclient run | score | status | check``).

Thin adapters over core: ``session`` (one site's conversation with fedserver: join, resumable
upload, delta bank download, watch; the only place that retries), ``site`` (fit, rounds, scoring,
the site's output folder), ``report`` (metrics.json, anomaly-map overlays), ``cli``.
"""
