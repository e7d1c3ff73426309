"""The fleet control plane: `builder serve` (device registry, telemetry store, chunk server,
embedded broker), push with canary and rollback, fleet status/telemetry/plot."""
