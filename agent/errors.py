"""The device side's exception tree; the agent CLI turns these into one-line messages."""
from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent reports."""

    exit_code: int = 1


class ConfigError(AgentError):
    """agent.toml is missing or invalid."""

    exit_code = 2


class ProtocolError(AgentError):
    """A message does not follow the wire protocol (unknown schema version, missing field)."""


class TransferError(AgentError):
    """A model transfer failed (chunk hash mismatch, timeout, not enough disk)."""


class SignatureError(AgentError):
    """A manifest's signature or a payload's hash does not verify against the trusted key."""


class InstallError(AgentError):
    """A model could not be installed or failed its health check; the previous one stays active."""


class RuntimeBackendError(AgentError):
    """A runtime backend could not load or run a model."""


class RequestError(AgentError):
    """A local /infer request does not fit the active model (unknown or missing input, wrong shape or
    dtype); the application's fault, so it is answered 400 and never counts against the model."""
