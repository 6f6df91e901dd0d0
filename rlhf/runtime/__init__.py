"""The runtime every service shares: settings, logging, the gRPC server and clients, the event bus."""
