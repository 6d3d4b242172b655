"""The site ACL on a real Mosquitto: a machine publishes under its own topics only and reads only
its own commands; the bridge sees the whole site; unknown users and wrong passwords are refused."""

from __future__ import annotations

import time

import pytest

from central.broker_auth import BRIDGE_USER, new_credentials, site_acl, write_password_file
from edgeline.config import from_dict
from edgeline.services import MosquittoBroker, ServiceError
from tests.conftest import MqttProbe, service_unavailable

pytestmark = pytest.mark.integration


class AuthProbe(MqttProbe):
    def __init__(self, broker, user: str, password: str) -> None:
        super().__init__(broker.host, broker.port, f"acl-{user}")
        self.client.username_pw_set(user, password)


def drain(probe: MqttProbe, seconds: float = 1.5) -> list[str]:
    got, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            got.append(probe.get(timeout=0.1).topic)
        except TimeoutError:
            pass
    return got


@pytest.fixture
def secured(tmp_path):
    site = from_dict({"site": "plant", "machines": [{"id": "m01"}, {"id": "m02"}]})
    credentials = new_credentials(site)
    (tmp_path / "acl").write_text(site_acl(site))
    write_password_file(tmp_path / "passwd", credentials)
    broker = MosquittoBroker(workdir=tmp_path / "broker", password_file=tmp_path / "passwd",
                             acl_file=tmp_path / "acl")
    try:
        broker.start()
    except ServiceError as exc:
        broker.stop()
        service_unavailable(f"mosquitto unavailable: {exc}")
    probes: list[MqttProbe] = []

    def login(user: str, password: str | None = None) -> MqttProbe:
        probe = AuthProbe(broker, user, password or credentials[user])
        probes.append(probe)
        return probe

    yield login
    for probe in probes:
        probe.stop()
    broker.stop()


def test_a_machine_publishes_as_itself_only(secured):
    bridge = secured(BRIDGE_USER).start()
    bridge.subscribe("edgeline/v1/plant/#")
    m01 = secured("m01").start()
    m01.publish("edgeline/v1/plant/m01/heartbeat", b"{}")
    m01.publish("edgeline/v1/plant/m02/heartbeat", b"{}")  # as m02: dropped by the broker
    m01.publish("edgeline/v1/other-site/m01/heartbeat", b"{}")
    assert drain(bridge) == ["edgeline/v1/plant/m01/heartbeat"]


def test_a_machine_reads_only_its_own_commands(secured):
    m01, m02 = secured("m01").start(), secured("m02").start()
    m01.subscribe("edgeline/v1/plant/+/cmd/#")
    m02.subscribe("edgeline/v1/plant/m02/cmd/#")
    bridge = secured(BRIDGE_USER).start()
    bridge.publish("edgeline/v1/plant/m01/cmd/snapshot", b"{}")
    bridge.publish("edgeline/v1/plant/m02/cmd/snapshot", b"{}")
    assert drain(m01) == ["edgeline/v1/plant/m01/cmd/snapshot"]
    assert drain(m02, 0.5) == ["edgeline/v1/plant/m02/cmd/snapshot"]


@pytest.mark.parametrize("user, password", [("m01", "wrong"), ("intruder", "x")])
def test_wrong_password_or_unknown_user_cannot_connect(secured, user, password):
    probe = secured(user, password)
    refused: list[bool] = []
    probe.client.on_connect = lambda c, u, f, reason, p: refused.append(reason.is_failure)
    probe.client.connect_async(probe.host, probe.port)
    probe.client.loop_start()
    deadline = time.monotonic() + 5
    while not refused and time.monotonic() < deadline:
        time.sleep(0.05)
    assert refused and refused[0] is True
