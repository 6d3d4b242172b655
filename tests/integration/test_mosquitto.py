"""Mosquitto through the harness, with paho-mqtt 2 clients: QoS 1, retained messages,
last-wills, and a restart on the same port."""

from __future__ import annotations

import queue
import socket
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeline.services import MosquittoBroker, port_open, start_mqtt_broker
from stream.mqtt import MqttClient, MqttSettings

pytestmark = pytest.mark.integration


def test_qos1_publish_subscribe_in_order(mosquitto, mqtt_probe, unique_name):
    topic = f"edgeline/v1/{unique_name}/m01/result"
    sub = mqtt_probe(mosquitto, "sub")
    assert sub.subscribe(topic, qos=1) == [1]
    pub = mqtt_probe(mosquitto, "pub")

    payloads = [f"seq-{i}".encode() for i in range(200)]
    for payload in payloads:
        pub.publish(topic, payload, qos=1)

    got = sub.expect(len(payloads), timeout=15)
    assert [m.payload for m in got] == payloads
    assert {m.qos for m in got} == {1}
    assert {m.topic for m in got} == {topic}


def test_retained_message_reaches_late_subscriber(mosquitto, mqtt_probe, unique_name):
    topic = f"edgeline/v1/{unique_name}/m01/status"
    pub = mqtt_probe(mosquitto, "pub")
    pub.publish(topic, b"online", qos=1, retain=True)

    late = mqtt_probe(mosquitto, "late")
    late.subscribe(topic, qos=1)
    msg = late.get(timeout=5)
    assert (msg.payload, msg.retain) == (b"online", True)

    pub.publish(topic, b"", qos=1, retain=True)  # clear it: an empty retained payload deletes it
    later = mqtt_probe(mosquitto, "later")
    later.subscribe(topic, qos=1)
    with pytest.raises(TimeoutError):
        later.get(timeout=0.5)


def test_last_will_on_abrupt_disconnect(mosquitto, mqtt_probe, unique_name):
    status = f"edgeline/v1/{unique_name}/m07/status"
    watcher = mqtt_probe(mosquitto, "watcher")
    watcher.subscribe(status, qos=1)

    # A client with a will, driven by hand (no network thread) so its socket can be cut.
    dying = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{unique_name}-dying", protocol=paho.MQTTv311)
    dying.will_set(status, b"offline", qos=1, retain=True)
    connected = []
    dying.on_connect = lambda c, u, flags, rc, props: connected.append(rc)
    dying.connect(mosquitto.host, mosquitto.port, keepalive=30)
    deadline = time.monotonic() + 5
    while not connected and time.monotonic() < deadline:
        dying.loop(timeout=0.1)
    assert connected and not connected[0].is_failure
    dying.publish(status, b"online", qos=1, retain=True)
    dying.loop(timeout=0.2)
    assert watcher.get(timeout=5).payload == b"online"

    # Die without DISCONNECT: the broker must publish the will.
    sock = dying.socket()
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()

    will = watcher.get(timeout=5)
    assert (will.topic, will.payload) == (status, b"offline")

    # Retained, so a dashboard that comes later still sees the machine offline.
    late = mqtt_probe(mosquitto, "late")
    late.subscribe(status, qos=1)
    assert late.get(timeout=5).payload == b"offline"
    late.publish(status, b"", qos=1, retain=True)


def test_restart_keeps_port_and_persistent_session(tmp_path, mqtt_probe, unique_name):
    topic = f"edgeline/v1/{unique_name}/m01/cmd/reload"
    with MosquittoBroker(workdir=tmp_path, persistence=True) as broker:
        port = broker.port
        sub = mqtt_probe(broker, "sub", clean_session=False)
        sub.subscribe(topic, qos=1)
        sub.stop()  # offline now; the broker keeps its session and queues QoS 1 messages for it
        pub = mqtt_probe(broker, "pub")
        for i in range(5):
            pub.publish(topic, f"{i}".encode(), qos=1)

        first_pid = broker.pid
        assert pub.connects == 1
        broker.restart()
        assert broker.port == port and broker.pid != first_pid
        assert port_open(broker.host, port)

        # The publisher's network thread reconnects by itself to the same port.
        deadline = time.monotonic() + 10
        while pub.connects < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pub.connects == 2
        pub.publish(topic, b"after-restart", qos=1)

        # The persistent session survived the restart with its queued messages.
        back = mqtt_probe(broker, "sub", clean_session=False)
        assert back.session_present
        got = back.expect(6, timeout=10)
        assert [m.payload for m in got] == [b"0", b"1", b"2", b"3", b"4", b"after-restart"]
        back.stop()
        pub.stop()  # before the broker goes, or paho's thread sits in its reconnect delay
    assert not port_open("127.0.0.1", port)


def test_start_mqtt_broker_prefers_mosquitto(mosquitto, mqtt_probe, unique_name):
    # The `mosquitto` fixture is only requested so that a missing binary skips (or fails in CI).
    broker = start_mqtt_broker()
    try:
        assert isinstance(broker, MosquittoBroker) and broker.port != mosquitto.port
        probe = mqtt_probe(broker, "probe")
        probe.subscribe(f"{unique_name}/x")
        probe.publish(f"{unique_name}/x", b"hi")
        assert probe.get(timeout=5).payload == b"hi"
        probe.stop()
    finally:
        broker.stop()


def test_the_clients_wait_connected_returns_only_once_its_subscriptions_are_granted(mosquitto, mqtt_probe,
                                                                                     unique_name):
    """A service that reports ready after ``wait_connected`` hears a message published right then
    (the embedded runner serves its metrics, the readiness tests poll for, only after it)."""
    topic = f"edgeline/v1/{unique_name}/m01/result/cam1"
    client = MqttClient(MqttSettings(host=mosquitto.host, port=mosquitto.port), client_id=f"{unique_name}-ready")
    got: queue.Queue[bytes] = queue.Queue()
    client.subscribe(topic, lambda message: got.put(message.payload))
    client.start()
    try:
        client.wait_connected()
        assert client.subscribed.is_set()
        mqtt_probe(mosquitto, "pub").publish(topic, b"right after ready", qos=1)
        assert got.get(timeout=5) == b"right after ready"
    finally:
        client.stop()
    assert not client.subscribed.is_set()
