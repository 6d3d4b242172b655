"""The site ACL on a real Mosquitto: a machine publishes under its own topics only and reads only
its own commands; the bridge sees the whole site; unknown users and wrong passwords are refused."""

from __future__ import annotations

import time

import pytest

from central.broker_auth import BRIDGE_USER, new_credentials, site_acl, write_password_file
from edge.agent import EdgeAgent
from edgeline.config import from_dict
from edgeline.services import MosquittoBroker, ServiceError
from stream.messages import Command
from stream.topics import command_topic
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
def credentials():
    return new_credentials(from_dict({"site": "plant", "machines": [{"id": "m01"}, {"id": "m02"}]}))


@pytest.fixture
def secured(tmp_path, credentials):
    site = from_dict({"site": "plant", "machines": [{"id": "m01"}, {"id": "m02"}]})
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

    login.broker = broker  # type: ignore[attr-defined]
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


def test_an_edge_agent_logs_in_with_its_own_credentials(secured, credentials, tmp_path):
    """broker.username '{machine}' and password_file 'secrets/{machine}.pass': the agent is m01 to the broker."""
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "m01.pass").write_text(credentials["m01"] + "\n")
    broker = secured.broker
    config = from_dict({
        "site": "plant", "broker": {"host": broker.host, "port": broker.port, "username": "{machine}",
                                    "password_file": "secrets/{machine}.pass"},
        "models": {"seg": {"path": "builtin:seg-synth-int8"}},
        "machines": [{"id": "m01", "cameras": [{"id": "c1", "models": ["seg"], "fps": 5}]}],
        "outbox": {"path": str(tmp_path / "{machine}.sqlite")}, "metrics": {"enabled": False},
    }, base_dir=tmp_path)
    bridge = secured(BRIDGE_USER).start()
    bridge.subscribe("edgeline/v1/plant/m01/#")
    agent = EdgeAgent(config, "m01", base_dir=tmp_path, heartbeat_s=0.5)
    agent.start()
    try:
        command = Command(site="plant", machine="m01", ts=time.time(), name="set_fps", args={"fps": 2})
        time.sleep(1.0)
        bridge.publish(command_topic("plant", "m01", "set_fps"), command.to_json())
        topics = drain(bridge, 3.0)
        assert "edgeline/v1/plant/m01/heartbeat" in topics and "edgeline/v1/plant/m01/result/c1" in topics
        assert agent.cameras[0].fps == 2.0  # the agent read its own command
    finally:
        agent.stop()
