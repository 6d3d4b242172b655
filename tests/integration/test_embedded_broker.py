"""The pure-Python (amqtt) broker that the demo falls back to, with paho-mqtt 2 clients."""

from __future__ import annotations

import threading

import pytest

from edgeline.services import EmbeddedBroker, port_open, start_mqtt_broker

pytestmark = pytest.mark.integration


@pytest.fixture
def embedded():
    with EmbeddedBroker() as broker:
        yield broker


def test_qos1_publish_subscribe(embedded, mqtt_probe, unique_name):
    topic = f"edgeline/v1/{unique_name}/m01/result"
    sub = mqtt_probe(embedded, "sub")
    assert sub.subscribe(topic, qos=1) == [1]
    wildcard = mqtt_probe(embedded, "wild")
    assert wildcard.subscribe(f"edgeline/v1/{unique_name}/+/#", qos=1) == [1]
    pub = mqtt_probe(embedded, "pub")

    payloads = [f"seq-{i}".encode() for i in range(100)]
    for payload in payloads:
        pub.publish(topic, payload, qos=1)

    for probe in (sub, wildcard):
        got = probe.expect(len(payloads), timeout=15)
        assert [m.payload for m in got] == payloads
        assert {m.qos for m in got} == {1}


def test_retained_and_last_will(embedded, mqtt_probe, unique_name):
    status = f"edgeline/v1/{unique_name}/m02/status"
    pub = mqtt_probe(embedded, "pub")
    pub.publish(status, b"online", qos=1, retain=True)
    late = mqtt_probe(embedded, "late")
    late.subscribe(status, qos=1)
    msg = late.get(timeout=5)
    assert (msg.payload, msg.retain) == (b"online", True)

    dying = mqtt_probe(embedded, "dying", will=(status, b"offline", 1, True))
    dying.client.loop_stop()
    sock = dying.client.socket()
    sock.close()  # gone without DISCONNECT
    assert late.get(timeout=10).payload == b"offline"


def test_stop_frees_port_and_thread(mqtt_probe):
    broker = EmbeddedBroker()
    broker.start()
    port = broker.port
    assert port_open(broker.host, port)
    broker.stop()
    assert not port_open(broker.host, port)
    assert not any(t.name == "mqtt:embedded-broker" for t in threading.enumerate())


def test_start_mqtt_broker_falls_back_to_embedded():
    broker = start_mqtt_broker(prefer_mosquitto=False)
    try:
        assert isinstance(broker, EmbeddedBroker)
        assert port_open(broker.host, broker.port)
    finally:
        broker.stop()
