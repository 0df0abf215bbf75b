"""fedclient: the site CLI and gRPC client over core.federated.PatchCoreClient (next issue)."""
