"""The MQTT client says why it cannot connect: a host name that does not resolve (the compose
hostname on one box) reads differently from a broker that does not answer. No broker needed."""

from __future__ import annotations

import logging

import pytest

from edgeline.services import free_port
from stream.mqtt import MqttClient, MqttSettings


def failed_wait(settings: MqttSettings, caplog: pytest.LogCaptureFixture) -> str:
    """Start a client that cannot connect; return the error of a 3 s wait (the warning is logged by then)."""
    client = MqttClient(settings, client_id="unit-unreachable")
    with caplog.at_level(logging.WARNING, logger="stream.mqtt"):
        client.start()
        try:
            with pytest.raises(ConnectionError) as caught:
                client.wait_connected(timeout=3.0)
        finally:
            client.stop()
    return str(caught.value)


def test_a_host_that_does_not_resolve_is_named(caplog: pytest.LogCaptureFixture) -> None:
    error = failed_wait(MqttSettings(host="no-such-broker.invalid", port=1883, reconnect_max_s=1), caplog)
    expected = "cannot resolve broker host 'no-such-broker.invalid' (is this the compose hostname? use --broker"
    assert expected in error
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w for w in warnings if expected in w] == warnings[:1] and len(warnings) == 1  # once, not every retry


def test_a_broker_that_does_not_answer_is_not_called_unresolvable(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    error = failed_wait(MqttSettings(host="127.0.0.1", port=port), caplog)
    assert f"cannot connect to broker 127.0.0.1:{port}" in error
    assert "resolve" not in caplog.text
