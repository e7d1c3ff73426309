"""The agent's broker connection: the shared ``agent.mqtt.MqttClient`` configured from
``agent.toml`` — MQTT 5 with 3.1.1 fallback, TLS, username/password, a persistent session (24 h),
reconnect with capped exponential backoff and jitter, and a retained last will "offline".

Handlers are registered with ``subscribe`` before ``start()``; ``stop(final)`` publishes the
final retained status before disconnecting.
"""
from __future__ import annotations

from typing import Callable

from agent.config import BrokerSettings
from agent.mqtt import ClientSettings, MqttClient, MqttVersion, TlsSettings, Will

SESSION_EXPIRY_S = 24 * 3600
MAX_INFLIGHT = 32


def agent_client_settings(client_id: str, settings: BrokerSettings, will: Will | None = None) -> ClientSettings:
    """``agent.toml``'s broker section as client settings (the device id is the client id)."""
    tls = TlsSettings(settings.ca_file, settings.client_cert, settings.client_key) if settings.tls else None
    return ClientSettings(host=settings.host, port=settings.port, client_id=client_id, username=settings.username,
                          password=settings.password, tls=tls, will=will, version=MqttVersion(settings.protocol),
                          persistent_session=True, session_expiry_s=SESSION_EXPIRY_S, keepalive_s=settings.keepalive_s,
                          max_inflight=MAX_INFLIGHT, reconnect_min_s=settings.reconnect_min_s,
                          reconnect_max_s=settings.reconnect_max_s)


def agent_connection(client_id: str, settings: BrokerSettings, *, will: Will | None = None,
                     on_connected: Callable[[], None] | None = None) -> MqttClient:
    """The agent's client; call ``start()`` once its handlers are subscribed."""
    return MqttClient(agent_client_settings(client_id, settings, will), on_connect=on_connected)
