"""The host's link maps the shared client's typed errors to FleetError: a refused SUBACK is no
longer ignored (a host that cannot hear replies or chunk requests must say so)."""
from __future__ import annotations

import pytest

from agent import protocol as proto
from builder.errors import FleetError
from tests.support.broker import MosquittoBroker, dynsec_plugin, mosquitto_available

pytestmark = [pytest.mark.mosquitto,
              pytest.mark.skipif(not mosquitto_available() or dynsec_plugin() is None,
                                 reason="needs mosquitto with its dynamic-security plugin")]


def test_host_subscribe_raises_when_the_broker_refuses():
    from builder.fleet.transport.link import BrokerEndpoint, FleetLink

    with MosquittoBroker(subscribe_allowed=[proto.all_devices_topic(proto.Up.STATUS)]) as broker, \
            FleetLink(BrokerEndpoint(broker.url)).connect() as link:
        link.subscribe(proto.all_devices_topic(proto.Up.STATUS), lambda topic, payload: None)  # allowed
        with pytest.raises(FleetError, match=r"refused the subscription to edgefleet/v1/devices/\+/up/reply.*0x80"):
            link.command("dev1", proto.StatusArgs(), timeout_s=1)  # it must hear replies first
        with pytest.raises(FleetError, match="0x80"):
            link.watch_replies()  # not remembered as watched after the refusal
