"""fedserver: the gRPC daemon over core.federated.GlobalBankAggregator (next issue)."""
