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


class MqttError(AgentError):
    """The broker connection failed or the broker refused an operation (``agent/mqtt.py``)."""


class MqttConnectError(MqttError):
    """The broker is unreachable (``reachable`` False), refused the CONNECT (``refused`` holds its
    reason) or did not answer it."""

    def __init__(self, message: str, *, reachable: bool, refused: str | None = None) -> None:
        super().__init__(message)
        self.reachable = reachable
        self.refused = refused


class SubscribeRefusedError(MqttError):
    """The broker's SUBACK refused a topic filter (0x80 in MQTT 3.1.1, a reason code >= 0x80 in MQTT 5:
    typically the ACL denies it)."""

    def __init__(self, topic_filter: str, reason: str, reason_code: int) -> None:
        super().__init__(f"the broker refused the subscription to {topic_filter}: {reason} "
                         f"(reason code 0x{reason_code:02x}); check the broker's ACL for this user")
        self.topic_filter = topic_filter
        self.reason = reason
        self.reason_code = reason_code


class PublishError(MqttError):
    """A message could not be handed to the broker (no connection, queue full)."""
