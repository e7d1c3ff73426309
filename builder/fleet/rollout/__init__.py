"""Getting artifacts onto devices: push with canary and rollback, on-device trials, fleet status and plots."""
