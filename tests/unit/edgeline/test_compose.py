"""docker-compose.yml: checked without a Docker engine.

The structure is checked in Python (images or builds, Dockerfiles, bind mounts, depends_on,
ports); when a compose binary that can run ``config`` offline is installed (Debian's
``docker-compose`` v1, which scripts/install-test-deps.sh installs), the file is also validated
by Compose itself.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[3]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
EDGE_MACHINES = ("m01", "m02", "m03")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def test_expected_services(services):
    assert {"mosquitto", "kafka", "bridge", "worker", "rules", *(f"edge-{m}" for m in EDGE_MACHINES)} <= set(services)


def test_every_service_has_image_or_build(services):
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name


def test_build_dockerfiles_exist(services):
    for name, svc in services.items():
        build = svc.get("build")
        if build is None:
            continue
        context = REPO_ROOT / (build if isinstance(build, str) else build.get("context", "."))
        assert context.is_dir(), f"{name}: build context {context} missing"
        dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"


def _bind_sources(svc: dict) -> list[str]:
    sources = []
    for volume in svc.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                sources.append(volume["source"])
        elif volume.split(":", 1)[0].startswith((".", "/", "~")):
            sources.append(volume.split(":", 1)[0])
    return sources


def test_bind_mounted_host_paths_exist(compose, services):
    named = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for source in _bind_sources(svc):
            assert (REPO_ROOT / source).exists(), f"{name}: bind mount source {source} missing"
        for volume in svc.get("volumes", []):
            if isinstance(volume, str) and not volume.startswith((".", "/", "~")):
                assert volume.split(":", 1)[0] in named, f"{name}: named volume {volume} not declared"


def test_depends_on_names_exist(services):
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        for dep in deps:
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert dep != name
        if isinstance(deps, dict):
            for dep, spec in deps.items():
                assert spec.get("condition") in {"service_started", "service_healthy", "service_completed_successfully"}
                if spec.get("condition") == "service_healthy":
                    assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy, but it has no healthcheck"


def test_published_ports_unique(services):
    published = []
    for svc in services.values():
        for port in svc.get("ports", []):
            spec = str(port["published"]) if isinstance(port, dict) else str(port).rsplit(":", 1)[0]
            published.append(spec)
    assert len(published) == len(set(published)), published


def test_edges_and_rules_use_the_cli_and_mounted_config(services):
    assert services["rules"]["command"][:2] == ["stream", "embedded"]
    assert services["rules"]["profiles"] == ["one-box"]  # the Kafka pipeline runs by default
    for name in ("bridge", "worker"):
        command = services[name]["command"]
        assert command[:2] == ["stream", name] and command[command.index("--kafka") + 1] == "kafka:19092"
        assert {"mosquitto", "kafka"} <= set(services[name]["depends_on"])
    for machine in EDGE_MACHINES:
        svc = services[f"edge-{machine}"]
        command = svc["command"]
        assert command[:2] == ["edge", "run"]
        assert command[command.index("--machine") + 1] == machine
        config = command[command.index("--config") + 1]
        assert config.startswith("/config/")
        assert (REPO_ROOT / "config" / Path(config).name).is_file()
        assert "mosquitto" in svc["depends_on"]


def test_kafka_is_single_node_kraft(services):
    env = services["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert str(env["KAFKA_NODE_ID"]) == "1"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith("1@kafka:")
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"):
        assert str(env[key]) == "1"


def _compose_command() -> list[str] | None:
    """A compose that can run ``config`` without an engine: docker-compose v1, or the v2 plugin."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def test_compose_config_validates():
    command = _compose_command()
    if command is None:
        pytest.skip("no docker-compose / docker compose binary (scripts/install-test-deps.sh installs Debian's docker-compose)")
    done = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr or done.stdout


MQTT_CLIENTS = {"bridge": "edgeline-bridge", "central": "edgeline-central", "rules": "edgeline-rules",
                **{f"edge-{m}": m for m in EDGE_MACHINES}}


def test_every_mqtt_client_logs_in_as_its_own_broker_auth_user(services):
    from central.broker_auth import SERVICE_USERS
    from edgeline.config import load

    site = load(REPO_ROOT / "config" / "site.yaml")
    known_users = {*SERVICE_USERS, *(m.id for m in site.machines)}
    for name, user in MQTT_CLIENTS.items():
        env, volumes = services[name]["environment"], services[name]["volumes"]
        assert env["EDGELINE_MQTT_USERNAME"] == user and user in known_users, name
        mount = next(v.split(":")[1] for v in volumes if v.startswith("broker-auth:"))
        assert env["EDGELINE_MQTT_PASSWORD_FILE"] == f"{mount}/secrets/{user}.pass", name
        assert f"broker-auth:{mount}:ro" in volumes, name
        assert "mosquitto" in services[name]["depends_on"], name


def test_the_broker_needs_the_generated_auth_first(services):
    assert services["mosquitto"]["depends_on"]["broker-auth"]["condition"] == "service_completed_successfully"
    assert "broker-auth:/mosquitto/auth:ro" in services["mosquitto"]["volumes"]
    assert "central broker-auth --config /config/site.yaml --out /auth" in services["broker-auth"]["command"][0]
    conf = (REPO_ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text().splitlines()
    assert {"allow_anonymous false", "password_file /mosquitto/auth/passwd", "acl_file /mosquitto/auth/acl"} <= set(conf)
