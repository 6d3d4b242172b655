"""`edgeline central serve` as a real process on a real port, and the `edgeline central` client
commands against it: upload a signed package with the token, refuse one without it, inspect and
download it back, register and list machines; a rollout started, shown and aborted from the CLI,
with clear refusals of an unknown machine and an unknown operation. Output is read piped, as a
script would: tables whole, ``--json`` raw."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgeline.services import free_port
from models.package import BUILTIN_PACKAGES, write_package_tar
from stream.messages import Alert, Heartbeat
from stream.topics import mqtt_topic, topic_for
from tests.integration.central_process import CENTRAL_CLI, client_env
from tests.integration.central_process import start_central as start_central_process

pytestmark = pytest.mark.integration
TOKEN = "a-long-enough-api-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
READ_TOKEN = "a-long-enough-read-token"
READ = {"Authorization": f"Bearer {READ_TOKEN}"}
READER = {"EDGELINE_CENTRAL_READ_TOKEN": READ_TOKEN}
"""How a client with the read token runs: ``central_cli(..., **READER)``."""
CLI = CENTRAL_CLI
ISO_UTC = re.compile(r"\b\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\b")


def central_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=client_env(**env), timeout=120)


def start_central(tmp_path: Path, mosquitto, site: str, *options: str) -> tuple[subprocess.Popen, str]:
    """``central serve`` for ``site`` (machines m01, m02) with ``options``; the token comes from the
    file named by $EDGELINE_CENTRAL_TOKEN_FILE, the read token from $EDGELINE_CENTRAL_READ_TOKEN."""
    (tmp_path / "token").write_text(TOKEN + "\n")
    site_yaml = (f"site: {site}\nbroker: {{host: {mosquitto.host}, port: {mosquitto.port}}}\n"
                 "machines: [{id: m01, line: line-1, cameras: [{id: c1}, {id: c2}]}, {id: m02, cameras: [{id: c1}]}]\n")
    return start_central_process(tmp_path, site_yaml, *options,
                                 env=client_env(EDGELINE_CENTRAL_TOKEN_FILE=str(tmp_path / "token"), **READER))


@pytest.fixture
def central(tmp_path: Path, mosquitto, unique_name: str) -> Iterator[str]:
    server, base = start_central(tmp_path, mosquitto, unique_name)
    try:
        yield base
    finally:
        server.terminate()
        server.wait(10)


def test_central_serve_shuts_down_in_order_on_sigterm(tmp_path, mosquitto, unique_name):
    """uvicorn re-raises the SIGTERM it handled; the rollout manager must still be stopped and the
    process exit 0, as systemd and compose expect of a clean stop."""
    server, _ = start_central(tmp_path, mosquitto, unique_name)
    server.terminate()
    output, _ = server.communicate(timeout=20)
    assert server.returncode == 0, output


def test_central_serves_the_model_registry_over_http(tmp_path, central):
    base = central
    tar = write_package_tar(BUILTIN_PACKAGES / "seg-synth-fp32", tmp_path / "p.tar").read_bytes()
    assert httpx.post(f"{base}/models", content=tar).status_code == 401
    created = httpx.post(f"{base}/models", content=tar, headers={"Authorization": f"Bearer {TOKEN}"})
    assert created.status_code == 201, created.text
    assert httpx.get(f"{base}/models/{created.json()['id']}/download", headers=READ).content == tar
    assert httpx.get(f"{base}/openapi.json", headers=READ).json()["info"]["title"] == "Edgeline central"
    m01, _ = httpx.get(f"{base}/machines", headers=READ).json()  # the site file's machines, registered at start
    assert (m01["id"], m01["line"], m01["cameras"], m01["status"]) == ("m01", "line-1", ["c1", "c2"], "unknown")
    upload = central_cli("upload", str(BUILTIN_PACKAGES / "seg-synth-int8"), "--url", base,
                         EDGELINE_CENTRAL_TOKEN=TOKEN)  # the token's value, as serve also takes it
    assert upload.returncode == 0 and "registered seg-synth-1.0.0-int8" in upload.stdout, upload.stderr
    again = central_cli("upload", str(BUILTIN_PACKAGES / "seg-synth-int8"), "--url", base,
                        "--token-file", str(tmp_path / "token"))
    assert again.returncode == 1 and "409" in again.stderr and "already registered" in again.stderr
    listed = central_cli("models", "--url", base, **READER)
    assert listed.returncode == 0 and "…" not in listed.stdout
    assert "| seg-synth-1.0.0-fp32 |" in listed.stdout and "| seg-synth-1.0.0-int8 |" in listed.stdout
    assert [p["id"] for p in json.loads(central_cli("models", "--url", base, "--json", **READER).stdout)] == [
        "seg-synth-1.0.0-fp32", "seg-synth-1.0.0-int8"]
    inspected = central_cli("model", "seg-synth-1.0.0-int8", "--url", base, **READER)
    assert json.loads(inspected.stdout)["manifest"]["precision"] == "int8"
    fetched = central_cli("download", "seg-synth-1.0.0-int8", "--out", str(tmp_path), "--url", base, **READER)
    assert fetched.returncode == 0 and "wrote" in fetched.stdout
    assert (tmp_path / "seg-synth-1.0.0-int8.tar").read_bytes() == httpx.get(
        f"{base}/models/seg-synth-1.0.0-int8/download", headers=AUTH).content
    registered = central_cli("register-machine", "m03", "--site", "other", "--line", "line-2", "--cameras",
                             "top,side", "--url", base, EDGELINE_CENTRAL_TOKEN_FILE=str(tmp_path / "token"))
    assert registered.returncode == 0 and "machine m03: site other, line line-2, 2 cameras" in registered.stdout
    unauthorised = central_cli("register-machine", "m04", "--site", "plant", "--url", base)
    assert unauthorised.returncode == 1 and "401" in unauthorised.stderr and "--token-file" in unauthorised.stderr
    fleet = central_cli("machines", "--url", base, **READER)
    assert fleet.returncode == 0 and "| m03 " in fleet.stdout and "| top, side |" in fleet.stdout
    assert [m["id"] for m in json.loads(central_cli("machines", "--url", base, "--json",
                                                    EDGELINE_CENTRAL_TOKEN_FILE=str(tmp_path / "token")).stdout)] == [
        "m01", "m02", "m03"]  # the write token also reads


def test_every_read_needs_a_token_and_metrics_may_stay_open(tmp_path, central):
    """Issue 13 defect 14 on a real `central serve`: no read answers without a token; the read token
    reads but does not write; a client without a token gets a one-line 401 naming the options."""
    base = central
    tar = write_package_tar(BUILTIN_PACKAGES / "seg-synth-int8", tmp_path / "p.tar").read_bytes()
    assert httpx.post(f"{base}/models", content=tar, headers=AUTH).status_code == 201
    for path in ("/models", "/models/seg-synth-1.0.0-int8", "/models/seg-synth-1.0.0-int8/download", "/machines",
                 "/machines/m01", "/rollouts", "/docs", "/openapi.json"):
        assert httpx.get(f"{base}{path}").status_code == 401, path
        assert httpx.get(f"{base}{path}", headers=READ).status_code == 200, path
    assert httpx.get(f"{base}/metrics").status_code == 200
    assert httpx.post(f"{base}/models", content=tar, headers=READ).status_code == 403
    for command in (["models"], ["machines"], ["rollouts"], ["wait", "--machines", "m01", "--timeout", "1"]):
        refused = central_cli(*command, "--url", base)
        assert refused.returncode == 1 and refused.stderr.startswith("401: reads need the read token"), refused
        assert "--read-token-file" in refused.stderr and "$EDGELINE_CENTRAL_TOKEN_FILE" in refused.stderr
        read = central_cli(*command, "--url", base, "--read-token-file", str(tmp_path / "token"))  # any token file
        if command[0] == "wait":  # the token was taken: central answered, and m01 never reported
            assert read.returncode == 1 and read.stderr.startswith("no heartbeat from m01"), read
        else:
            assert read.returncode == 0, read


def heartbeat(probe, site: str, package: str) -> None:
    """One heartbeat from m01, as if it ran ``package`` as model ``seg``."""
    beat = Heartbeat(site=site, machine="m01", ts=time.time(), uptime_s=1.0, models={"seg": package})
    probe.publish(topic_for(beat), beat.to_json())


def report_running(probe, site: str, base: str, package: str) -> None:
    """Heartbeats from m01 running ``package`` until central's fleet shows it."""
    deadline = time.monotonic() + 30
    while httpx.get(f"{base}/machines/m01", headers=READ).json()["models"] != {"seg": package}:
        assert time.monotonic() < deadline, "central never saw m01's heartbeat"
        heartbeat(probe, site, package)
        time.sleep(0.3)


def follow(*args: str) -> tuple[subprocess.Popen, str]:
    """``central rollout ... --wait`` in the background, and the rollout id from its first line."""
    process = subprocess.Popen([*CLI, *args, "--wait"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=client_env(EDGELINE_CENTRAL_TOKEN=TOKEN))
    first = process.stdout.readline()
    assert first.startswith("rollout "), first + process.communicate(timeout=30)[0]
    return process, first.split()[1].rstrip(":")


def test_a_rollout_from_the_cli_refused_followed_aborted_and_completed(central, mqtt_probe, mosquitto, unique_name):
    base = central
    for name in ("seg-synth-fp32", "seg-synth-int8"):
        assert central_cli("upload", str(BUILTIN_PACKAGES / name), "--url", base,
                           EDGELINE_CENTRAL_TOKEN=TOKEN).returncode == 0
    start = ["rollout", "--package", "seg-synth-1.0.0-int8", "--model", "seg", "--stages", "1", "--url", base]
    unknown = central_cli(*start, "--machines", "m09", EDGELINE_CENTRAL_TOKEN=TOKEN)
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "404: no machine m09 in the fleet; known machines: m01, m02"
    silent = central_cli(*start, "--machines", "m01", EDGELINE_CENTRAL_TOKEN=TOKEN)
    assert silent.returncode == 1 and "409: m01 reported no running package for 'seg'" in silent.stderr
    early = central_cli("wait", "--machines", "m01", "--timeout", "1", "--url", base, **READER)
    assert early.returncode == 1 and "no heartbeat from m01" in early.stderr

    m01 = mqtt_probe(mosquitto, "m01")
    report_running(m01, unique_name, base, "seg-synth-1.0.0-fp32")
    assert central_cli("wait", "--machines", "m01", "--url", base, **READER).returncode == 0
    fleet = central_cli("machines", "--url", base, **READER)
    assert "seg=seg-synth-1.0.0-fp32" in fleet.stdout and "…" not in fleet.stdout

    waiting, rollout_id = follow(*start, "--machines", "m01")  # m01 never loads it: deploying until aborted
    status = central_cli("rollout-status", rollout_id, "--url", base, **READER)
    assert status.returncode == 0, status.stderr
    assert "stage 1 of 1 (stages counted from 1, 0 before the first)" in status.stdout
    assert ISO_UTC.search(status.stdout) and not re.search(r"\b1\d{9}\.\d+", status.stdout)  # no raw epochs
    raw = json.loads(central_cli("rollout-status", rollout_id, "--url", base, "--json", **READER).stdout)
    assert raw["stage"] == 1 and {e["stage"] for e in raw["history"]} == {1}
    assert isinstance(raw["history"][0]["ts"], float)
    listed = central_cli("rollouts", "--url", base, **READER)
    assert f"| {rollout_id} | seg-synth-1.0.0-int8 | seg-synth-1.0.0-fp32 |" in listed.stdout
    listed_json = json.loads(central_cli("rollouts", "--url", base, "--json", **READER).stdout)
    assert [r["id"] for r in listed_json] == [rollout_id]
    stop = central_cli("rollout-control", rollout_id, "stop", "--url", base, EDGELINE_CENTRAL_TOKEN=TOKEN)
    assert stop.returncode == 2 and "'stop' is not one of 'pause', 'resume', 'abort'" in stop.stderr
    aborted = central_cli("rollout-control", rollout_id, "abort", "--url", base, EDGELINE_CENTRAL_TOKEN=TOKEN)
    assert aborted.returncode == 0 and f"rollout {rollout_id}: rolled_back" in aborted.stdout, aborted.stderr
    followed = waiting.communicate(timeout=30)[0]
    assert waiting.returncode == 1 and f"rollout {rollout_id}: rolled_back (aborted by operator)" in followed
    assert re.search(rf"^{ISO_UTC.pattern}  stage 1/1: deploying seg-synth-1.0.0-int8 to m01$", followed, re.MULTILINE)
    assert f"{rollout_id} failed: aborted by operator" in central_cli("rollouts", "--url", base, **READER).stdout

    good, good_id = follow(*start, "--machines", "m01", "--soak-s", "0")
    deadline = time.monotonic() + 60
    while good.poll() is None and time.monotonic() < deadline:
        heartbeat(m01, unique_name, "seg-synth-1.0.0-int8")  # m01 loaded the new package
        time.sleep(0.3)
    output = good.communicate(timeout=30)[0]
    assert good.returncode == 0 and f"rollout {good_id}: completed" in output, output


def test_central_takes_the_machine_from_the_topic_and_registers_no_stranger(tmp_path, mosquitto, unique_name,
                                                                             mqtt_probe):
    """Issue 13 defect 7: m01, on its own heartbeat topic, claims to be m02 running an evil package,
    and a heartbeat comes from ghost-99, a machine in neither the site file nor the registry: both
    are dropped and counted; m01's own heartbeat still counts."""
    server, base = start_central(tmp_path, mosquitto, unique_name)
    try:
        m01 = mqtt_probe(mosquitto, "m01")
        spoof = Heartbeat(site=unique_name, machine="m02", ts=time.time(), uptime_s=1.0, models={"seg": "evil-9.9.9"})
        m01.publish(mqtt_topic(unique_name, "m01", "heartbeat"), spoof.to_json())
        ghost = Heartbeat(site=unique_name, machine="ghost-99", ts=time.time(), uptime_s=1.0)
        m01.publish(topic_for(ghost), ghost.to_json())
        report_running(m01, unique_name, base, "seg-synth-1.0.0-fp32")  # after the two, on the same connection
        fleet = {m["id"]: m for m in httpx.get(f"{base}/machines", headers=READ).json()}
        assert sorted(fleet) == ["m01", "m02"]
        assert (fleet["m02"]["models"], fleet["m02"]["status"], fleet["m02"]["last_heartbeat"]) == ({}, "unknown", 0)
        metrics = httpx.get(f"{base}/metrics").text
        assert 'edgeline_central_messages_rejected_total{reason="identity"} 1.0' in metrics
        assert 'edgeline_central_messages_rejected_total{reason="unknown_machine"} 1.0' in metrics
        assert f'edgeline_central_restarts_total{{service="rollouts:{unique_name}/tick"}} 0.0' in metrics
    finally:
        server.terminate()
        server.wait(10)
    output = server.communicate()[0].decode()
    assert "(identity): the payload claims to come from" in output and "ghost-99 is in neither" in output


def test_central_registers_unknown_machines_only_when_told(tmp_path, mosquitto, unique_name, mqtt_probe):
    server, base = start_central(tmp_path, mosquitto, unique_name, "--register-unknown-machines")
    try:
        ghost = mqtt_probe(mosquitto, "ghost-99")
        deadline = time.monotonic() + 30
        while "ghost-99" not in [m["id"] for m in httpx.get(f"{base}/machines", headers=READ).json()]:
            assert time.monotonic() < deadline, "central never registered ghost-99"
            beat = Heartbeat(site=unique_name, machine="ghost-99", ts=time.time(), uptime_s=1.0)
            ghost.publish(topic_for(beat), beat.to_json())
            time.sleep(0.3)
    finally:
        server.terminate()
        server.wait(10)


def test_metrics_served_apart_stay_open_and_the_api_copy_needs_a_token(tmp_path, mosquitto, unique_name):
    metrics_port = free_port()
    server, base = start_central(tmp_path, mosquitto, unique_name, "--metrics-port", str(metrics_port))
    try:
        assert httpx.get(f"{base}/metrics").status_code == 401
        assert "edgeline_central_machines 2.0" in httpx.get(f"{base}/metrics", headers=READ).text
        assert "edgeline_central_machines 2.0" in httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    finally:
        server.terminate()
        server.wait(10)
    assert server.returncode == 0


def test_central_reads_the_alerts_of_a_kafka_site_and_keeps_each_once(tmp_path, mosquitto, kafka, unique_name):
    """`--alerts-from-kafka`: the workers' alerts topic into the alert store; a record produced twice
    (an at-least-once replay) is one episode, and one that is not an alert is counted, not kept."""
    from kafka import KafkaProducer

    prefix = unique_name.replace("_", "-")
    (tmp_path / "token").write_text(TOKEN + "\n")
    site_yaml = (f"site: {unique_name}\nbroker: {{host: {mosquitto.host}, port: {mosquitto.port}}}\n"
                 "machines: [{id: m01, line: line-1, cameras: [{id: c1}]}]\n"
                 f"stream: {{kafka: '{kafka.bootstrap}', topic_prefix: {prefix}}}\n")
    server, base = start_central_process(tmp_path, site_yaml, "--alerts-from-kafka",
                                         env=client_env(EDGELINE_CENTRAL_TOKEN_FILE=str(tmp_path / "token")))
    now = time.time()
    firing = Alert(msg_id="a" * 16, site=unique_name, machine="m01", ts=now, rule="surface-defect", state="firing",
                   severity="warning", scope="camera", key="m01/c1", value=3.0, camera="c1")
    resolved = firing.model_copy(update={"msg_id": "b" * 16, "state": "resolved", "ts": now + 5})
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap)
    try:
        for record in (firing.to_json(), firing.to_json(), b"{not an alert", resolved.to_json()):
            producer.send(f"{prefix}.alerts", key=b"m01", value=record)
        producer.flush(30)
        deadline = time.monotonic() + 60
        while True:
            alerts = httpx.get(f"{base}/alerts", headers=AUTH, timeout=5).json()
            if alerts and alerts[0]["state"] == "resolved" or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        metrics = httpx.get(f"{base}/metrics", timeout=5).text
    finally:
        producer.close()
        server.terminate()
        server.wait(10)
    assert [(a["id"], a["state"], a["line"]) for a in alerts] == [(firing.msg_id, "resolved", "line-1")]
    assert "edgeline_central_alert_messages_total 2.0" in metrics
    assert 'edgeline_central_alert_messages_rejected_total{reason="invalid"} 1.0' in metrics
