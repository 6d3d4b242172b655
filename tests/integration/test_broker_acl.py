"""The site ACL on a real Mosquitto, written by `edgeline central broker-auth`: a machine publishes
under its own topics only and reads only its own commands; the services see the whole site;
unknown users and wrong passwords are refused; a re-run keeps every existing secret."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import yaml
from typer.testing import CliRunner

from central.broker_auth import BRIDGE_USER, SERVICE_USERS
from edge.agent import EdgeAgent
from edgeline.cli import app
from edgeline.config import ConfigError, from_dict
from edgeline.services import MosquittoBroker, ServiceError, free_port, mosquitto_path, wait_for_port
from stream.messages import Command
from stream.settings import mqtt_settings
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


def broker_auth(tmp_path, machines: list[str]) -> dict[str, str]:
    """Run `edgeline central broker-auth` for a site of ``machines``; the credentials it wrote."""
    site_file = tmp_path / "site.yaml"
    site_file.write_text(yaml.safe_dump({"site": "plant", "machines": [{"id": m} for m in machines]}))
    done = CliRunner().invoke(app, ["central", "broker-auth", "--config", str(site_file),
                                    "--out", str(tmp_path / "auth")])
    assert done.exit_code == 0, done.output
    return yaml.safe_load((tmp_path / "auth" / "credentials.yaml").read_text())


@pytest.fixture
def credentials(tmp_path):
    return broker_auth(tmp_path, ["m01", "m02"])


@pytest.fixture
def secured(tmp_path, credentials):
    auth = tmp_path / "auth"
    broker = MosquittoBroker(workdir=tmp_path / "broker", password_file=auth / "passwd", acl_file=auth / "acl")
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


def test_a_machine_publishes_only_its_own_data_never_commands_alerts_or_decisions(secured):
    """Issue 13 defect 9: under its own id, m01 may send results, anomalies, heartbeats, events and
    its status; a command to itself, an alert or a decision is dropped by the broker."""
    bridge = secured(BRIDGE_USER).start()
    bridge.subscribe("edgeline/v1/plant/#")
    m01 = secured("m01").start()
    m01.subscribe("edgeline/v1/plant/m01/cmd/#")
    own = [f"edgeline/v1/plant/m01/{kind}" for kind in ("result/c1", "anomaly", "heartbeat", "event", "status")]
    forbidden = ["edgeline/v1/plant/m01/cmd/load_model", "edgeline/v1/plant/m01/alert",
                 "edgeline/v1/plant/m01/decision", "edgeline/v1/plant/m01/result/c1/extra"]
    for topic in forbidden + own:
        m01.publish(topic, b"{}")
    assert sorted(drain(bridge)) == sorted(own)
    assert drain(m01, 0.5) == []  # its own command never reached it


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


def test_an_edge_agent_logs_in_with_its_own_credentials(secured, tmp_path):
    """broker.username '{machine}' and password_file 'auth/secrets/{machine}.pass' (as broker-auth
    wrote it): the agent is m01 to the broker."""
    broker = secured.broker
    config = from_dict({
        "site": "plant", "broker": {"host": broker.host, "port": broker.port, "username": "{machine}",
                                    "password_file": "auth/secrets/{machine}.pass"},
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
        assert agent.vision.cameras[0].fps == 2.0  # the agent read its own command
    finally:
        agent.stop()


def test_a_rerun_keeps_every_secret_and_adds_the_new_machine(tmp_path, credentials):
    again = broker_auth(tmp_path, ["m01", "m02", "m03"])
    assert {u: again[u] for u in credentials} == credentials
    assert set(again) == {*SERVICE_USERS, "m01", "m02", "m03"} and len(set(again.values())) == len(again)
    for user, password in again.items():
        secret = tmp_path / "auth" / "secrets" / f"{user}.pass"
        assert secret.read_text().strip() == password and secret.stat().st_mode & 0o077 == 0


def test_a_service_logs_in_from_the_environment_and_sees_the_whole_site(secured, tmp_path, monkeypatch):
    """How compose runs central and the bridge: $EDGELINE_MQTT_USERNAME and $EDGELINE_MQTT_PASSWORD_FILE."""
    broker = secured.broker
    monkeypatch.setenv("EDGELINE_MQTT_USERNAME", "edgeline-central")
    monkeypatch.setenv("EDGELINE_MQTT_PASSWORD_FILE", str(tmp_path / "auth" / "secrets" / "edgeline-central.pass"))
    site = from_dict({"site": "plant", "broker": {"host": broker.host, "port": broker.port}})
    settings = mqtt_settings(site.broker)
    assert settings.username == "edgeline-central"
    central = secured("edgeline-central", settings.password).start()
    central.subscribe("edgeline/v1/plant/+/heartbeat")
    secured("m02").start().publish("edgeline/v1/plant/m02/heartbeat", b"{}")
    assert drain(central) == ["edgeline/v1/plant/m02/heartbeat"]
    monkeypatch.setenv("EDGELINE_MQTT_PASSWORD_FILE", str(tmp_path / "missing.pass"))
    with pytest.raises(ConfigError, match=r"\$EDGELINE_MQTT_PASSWORD_FILE: cannot read"):
        mqtt_settings(site.broker)


REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_compose_broker_config_admits_each_compose_client_and_no_one_else(tmp_path):
    """deploy/mosquitto/mosquitto.conf on a real Mosquitto (its container paths moved under
    tmp_path), with the auth that the compose service broker-auth writes for config/site.yaml:
    every compose MQTT client logs in with its compose environment; anonymous is refused."""
    if shutil.which("mosquitto_sub") is None:
        service_unavailable("mosquitto_sub is not installed (scripts/install-test-deps.sh)")
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    with compose_broker(tmp_path) as port:
        for service, spec in compose.items():
            env = spec.get("environment") or {}
            if "EDGELINE_MQTT_USERNAME" not in env:
                continue
            mount = next(v.split(":")[1] for v in spec["volumes"] if v.startswith("broker-auth:"))
            secret = Path(env["EDGELINE_MQTT_PASSWORD_FILE"].replace(mount, str(tmp_path / "auth")))
            assert login_refused(port, env["EDGELINE_MQTT_USERNAME"], secret.read_text().strip()) is False, service
        assert login_refused(port, None, None) is True
        health = compose["mosquitto"]["healthcheck"]["test"][1].replace("$$", "$")
        health = health.replace("/mosquitto/", f"{tmp_path}/").replace("-h 127.0.0.1", f"-h 127.0.0.1 -p {port}")
        assert subprocess.run(["sh", "-c", health], capture_output=True, timeout=10).returncode == 0, health


@contextmanager
def compose_broker(tmp_path: Path) -> Iterator[int]:
    """deploy/mosquitto/mosquitto.conf on a real Mosquitto (its container paths moved under
    tmp_path), with the auth broker-auth writes for config/site.yaml (site plant-a, m01..m03);
    yields its port."""
    binary = mosquitto_path()
    if binary is None:
        service_unavailable("mosquitto is not installed (scripts/install-test-deps.sh)")
    done = CliRunner().invoke(app, ["central", "broker-auth", "--config", str(REPO_ROOT / "config" / "site.yaml"),
                                    "--out", str(tmp_path / "auth")])
    assert done.exit_code == 0, done.output
    port = free_port()
    conf = (REPO_ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    conf = conf.replace("listener 1883 0.0.0.0", f"listener {port} 127.0.0.1").replace("/mosquitto/", f"{tmp_path}/")
    conf = re.sub(r"(?m)^log_dest stdout$", f"log_dest file {tmp_path}/mosquitto.log", conf)
    (tmp_path / "data").mkdir()
    (tmp_path / "mosquitto.conf").write_text(conf + ("user root\n" if os.geteuid() == 0 else ""))
    with open(tmp_path / "console.log", "wb") as console:
        broker = subprocess.Popen([binary, "-c", str(tmp_path / "mosquitto.conf")], stdout=console, stderr=console)
    try:
        wait_for_port("127.0.0.1", port, 10, proc=broker)
        yield port
    finally:
        broker.terminate()
        broker.wait(10)


def test_a_machine_cannot_take_over_the_bridge_client_id_or_its_session(tmp_path):
    """Issue 13 defect 8, on the compose broker config: m01 logging in with the bridge's client id
    and a clean session neither kicks the connected bridge off nor wipes its persistent session."""
    with compose_broker(tmp_path) as port:
        credentials = yaml.safe_load((tmp_path / "auth" / "credentials.yaml").read_text())
        probes: list[MqttProbe] = []

        def login(user: str, client_id: str, clean_session: bool = True) -> MqttProbe:
            probe = MqttProbe("127.0.0.1", port, client_id, clean_session=clean_session)
            probe.client.username_pw_set(user, credentials[user])
            probes.append(probe)
            return probe.start()

        try:
            bridge = login(BRIDGE_USER, "edgeline-bridge-plant-a", clean_session=False)
            bridge.subscribe("edgeline/v1/plant-a/+/result/+")
            impostor = login("m01", "edgeline-bridge-plant-a")
            m02 = login("m02", "edgeline-edge-m02")
            m02.publish("edgeline/v1/plant-a/m02/result/cam1", b"while the impostor is connected")
            assert bridge.get(timeout=5).payload == b"while the impostor is connected"
            assert bridge.connects == 1 and bridge.connected.is_set()  # never kicked off
            bridge.stop()
            for n in range(10):
                m02.publish("edgeline/v1/plant-a/m02/result/cam1", f"queued {n}".encode())
            impostor.stop()
            login("m01", "edgeline-bridge-plant-a")  # a clean session under the bridge's client id
            back = login(BRIDGE_USER, "edgeline-bridge-plant-a", clean_session=False)
            assert back.session_present
            assert [back.get(timeout=5).payload for _ in range(10)] == [f"queued {n}".encode() for n in range(10)]
        finally:
            for probe in probes:
                probe.stop()


def login_refused(port: int, user: str | None, password: str | None) -> bool:
    probe = MqttProbe("127.0.0.1", port, f"compose-{user}")
    if user is not None:
        probe.client.username_pw_set(user, password)
    answers: list[bool] = []
    probe.client.on_connect = lambda c, u, f, reason, p: answers.append(reason.is_failure)
    probe.client.connect_async("127.0.0.1", port)
    probe.client.loop_start()
    deadline = time.monotonic() + 5
    while not answers and time.monotonic() < deadline:
        time.sleep(0.05)
    probe.stop()
    assert answers, f"no CONNACK for {user}"
    return answers[0]
