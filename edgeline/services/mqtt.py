"""An MQTT broker for the demo and the tests: Mosquitto when installed, else the embedded one."""

from __future__ import annotations

import logging
from typing import Protocol

from edgeline.services.embedded_broker import EmbeddedBroker
from edgeline.services.mosquitto import MosquittoBroker, mosquitto_path
from edgeline.services.process import ServiceError

log = logging.getLogger(__name__)


class MqttBroker(Protocol):
    """What :func:`start_mqtt_broker` returns."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


def start_mqtt_broker(prefer_mosquitto: bool = True, port: int | None = None) -> MosquittoBroker | EmbeddedBroker:
    """A started MQTT broker: Mosquitto when installed (and preferred), else the embedded one."""
    if prefer_mosquitto and mosquitto_path() is not None:
        mosquitto = MosquittoBroker(port=port)
        try:
            mosquitto.start()
            return mosquitto
        except ServiceError:
            log.warning("mosquitto failed to start; falling back to the embedded broker", exc_info=True)
            mosquitto.stop()
    broker = EmbeddedBroker(port=port)
    broker.start()
    return broker
