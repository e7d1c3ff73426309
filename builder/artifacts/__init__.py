"""Artifacts: signing keys, packaging (payloads + signed manifest), and the local registry."""
