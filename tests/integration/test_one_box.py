"""Everything on one box, as the README runs it: the one-box site file with the broker given by
``--broker`` or ``EDGELINE_BROKER``, several agents side by side (each its own metrics port, and a
clear error when two want the same one), heartbeats that report the inferred frame rate, and the
embedded rules engine's console (alerts logged, counts printed at shutdown). Real Mosquitto."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from edge.agent import EdgeAgent
from edgeline.config import ConfigError
from edgeline.services import MosquittoBroker, free_port, scrape_metrics
from stream.messages import Alert, DefectRegion, FrameResult, Heartbeat, ModelOutput, Result, parse_message
from tests.conftest import edge_site
from tests.integration.central_process import client_env, start_central

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EDGELINE = [sys.executable, "-m", "edgeline.cli"]
SEG = {"seg": {"path": "builtin:seg-synth-int8"}}
CLASH = ("is already in use (another agent on this box? give each machine its own: machines[].metrics_port, "
         "or metrics.port: 0)")


def one_box_copy(tmp_path: Path, site: str, **metrics: Any) -> Path:
    """config/one-box.yaml under ``tmp_path`` (so its outboxes land there), for the test's own
    site, with free metrics ports."""
    raw = yaml.safe_load((REPO / "config" / "one-box.yaml").read_text())
    raw["site"] = site
    raw["metrics"].update(metrics)
    for machine in raw["machines"]:
        machine["metrics_port"] = free_port()
    path = tmp_path / "one-box.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class Command:
    """An ``edgeline`` command as a child process, its output in files (wide, so log lines stay whole)."""

    def __init__(self, tmp_path: Path, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self.stdout, self.stderr = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.proc = subprocess.Popen([*EDGELINE, *args], stdout=out, stderr=err, cwd=tmp_path,
                                         env=os.environ | {"PYTHONUNBUFFERED": "1", "COLUMNS": "250"} | (env or {}))

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (the commands' ordered shutdown), then wait."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def output(self) -> tuple[str, str]:
        """stdout and stderr, whitespace collapsed (a log line wrapped by the console reads whole)."""
        return " ".join(self.stdout.read_text().split()), " ".join(self.stderr.read_text().split())


def wait_for(condition: Callable[[], Any], timeout: float, what: str, command: Command | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := condition()):
            return value
        if command is not None and command.proc.poll() is not None:
            raise AssertionError(f"exited with {command.proc.returncode} before {what}: {command.output()}")
        time.sleep(0.2)
    raise TimeoutError(f"no {what} within {timeout:.0f} s")


def next_heartbeat(probe: Any, timeout: float) -> Heartbeat | None:
    try:
        message = parse_message(probe.get(timeout=timeout).payload)
    except TimeoutError:
        return None
    return message if isinstance(message, Heartbeat) else None


def inferring_heartbeat(probe: Any, camera: str) -> Callable[[], Heartbeat | None]:
    """A condition: the next heartbeat in which ``camera`` has inferred frames."""
    def condition() -> Heartbeat | None:
        beat = next_heartbeat(probe, timeout=1.0)
        cameras = {c.camera: c for c in beat.cameras} if beat else {}
        return beat if camera in cameras and cameras[camera].inferred_fps > 0 else None
    return condition


# ---------------------------------------------------------------- agents side by side


def test_two_agents_with_their_own_ports_both_serve_metrics(mosquitto: MosquittoBroker, unique_name: str,
                                                           tmp_path: Path) -> None:
    ports = {"m1": free_port(), "m2": free_port()}
    machines = [{"id": m, "metrics_port": port, "cameras": [{"id": "c1", "models": ["seg"], "fps": 5}]}
                for m, port in ports.items()]
    config = edge_site(mosquitto, unique_name, tmp_path, machines, SEG, metrics={"host": "127.0.0.1", "port": 9100})
    agents = [EdgeAgent(config, m) for m in ports]
    try:
        for agent in agents:
            agent.start()
        for machine, port in ports.items():
            key = f'edgeline_edge_frames_inferred_total{{camera="c1",machine="{machine}"}}'
            wait_for(lambda: scrape_metrics(port).get(key, 0) > 0, 30, f"inferred frames on {machine}'s :{port}")
    finally:
        for agent in agents:
            agent.stop()
    assert [agent.metrics_port for agent in agents] == list(ports.values())


def test_two_agents_on_one_metrics_port_get_a_clear_error(mosquitto: MosquittoBroker, unique_name: str,
                                                          tmp_path: Path) -> None:
    port = free_port()
    machines = [{"id": m, "cameras": [{"id": "c1"}]} for m in ("m1", "m2")]
    config = edge_site(mosquitto, unique_name, tmp_path, machines, SEG, metrics={"host": "127.0.0.1", "port": port})
    first, second = EdgeAgent(config, "m1"), EdgeAgent(config, "m2")
    first.start()
    try:
        with pytest.raises(ConfigError) as caught:
            second.start()
    finally:
        second.stop()
        first.stop()
    assert caught.value.problems == [f"metrics.port: 127.0.0.1:{port} {CLASH}"]
    with pytest.raises(sqlite3.ProgrammingError):  # the refused agent let go of its outbox
        second.outbox.oldest_age_s()


def test_edge_run_on_a_taken_metrics_port_exits_2_with_one_line(mosquitto: MosquittoBroker, unique_name: str,
                                                               tmp_path: Path) -> None:
    site = one_box_copy(tmp_path, unique_name)
    port = yaml.safe_load(site.read_text())["machines"][0]["metrics_port"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        agent = Command(tmp_path, "edge", ["edge", "run", "-c", str(site), "--machine", "m01",
                                           "--broker", f"{mosquitto.host}:{mosquitto.port}"])
        code = agent.proc.wait(120)
    out, err = agent.output()
    assert code == 2, (out, err)
    assert f"edge:m01: machines[0].metrics_port: 127.0.0.1:{port} {CLASH}" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------- heartbeats


def test_heartbeats_report_the_inferred_frame_rate(mosquitto: MosquittoBroker, mqtt_probe: Callable[..., Any],
                                                   unique_name: str, tmp_path: Path) -> None:
    cameras = [{"id": "seen", "models": ["seg"], "fps": 8}, {"id": "recorded", "fps": 8}]
    config = edge_site(mosquitto, unique_name, tmp_path, [{"id": "m1", "cameras": cameras}], SEG)
    probe = mqtt_probe(mosquitto)
    probe.subscribe(f"edgeline/v1/{unique_name}/m1/heartbeat")
    agent = EdgeAgent(config, "m1", heartbeat_s=1.0)
    agent.start()
    try:
        beat = wait_for(inferring_heartbeat(probe, "seen"), 30, "heartbeat with inferred frames")
    finally:
        agent.stop()
    status = {c.camera: c for c in beat.cameras}
    assert 0 < status["seen"].inferred_fps <= 8 * 1.5  # a rate, never above what the camera offers
    assert status["recorded"].inferred_fps == 0.0  # no model: nothing inferred
    assert status["recorded"].fps == 8


# ---------------------------------------------------------------- the one-box site from the command line


def test_edge_run_with_the_one_box_site_and_the_broker_from_the_environment(
        mosquitto: MosquittoBroker, mqtt_probe: Callable[..., Any], unique_name: str, tmp_path: Path) -> None:
    site = one_box_copy(tmp_path, unique_name)
    probe = mqtt_probe(mosquitto)
    probe.subscribe(f"edgeline/v1/{unique_name}/m01/heartbeat")
    agent = Command(tmp_path, "edge", ["edge", "run", "-c", str(site), "--machine", "m01"],
                    env={"EDGELINE_BROKER": f"{mosquitto.host}:{mosquitto.port}"})
    try:
        beat = wait_for(inferring_heartbeat(probe, "cam1"), 90, "heartbeat from edge run", agent)
    finally:
        code = agent.stop()
    assert code == 0, agent.output()
    status = {c.camera: c for c in beat.cameras}
    assert status["cam1"].inferred_fps > 0 and status["overview"].inferred_fps == 0.0
    assert (tmp_path / "var" / "outbox-m01.sqlite").is_file()  # relative to the site file


def defect_result(site: str, ts: float, seq: int) -> Result:
    output = ModelOutput(model="seg-synth", version="1.0.0", latency_ms=10.0, defect_ratio=0.02,
                         regions=[DefectRegion(cls="defect", area=40, bbox=(0, 0, 8, 5), score=0.9)])
    return Result(site=site, machine="m01", camera="cam1", ts=ts, frames=[FrameResult(seq=seq, ts=ts, outputs=[output])])


def test_stream_embedded_logs_alerts_binds_metrics_host_and_prints_its_counts(
        mosquitto: MosquittoBroker, mqtt_probe: Callable[..., Any], unique_name: str, tmp_path: Path) -> None:
    site = one_box_copy(tmp_path, unique_name, host="127.0.0.2")  # loopback, but not 127.0.0.1
    port = free_port()
    rules = Command(tmp_path, "rules", ["stream", "embedded", "-c", str(site), "--metrics-port", str(port),
                                        "--broker", f"{mosquitto.host}:{mosquitto.port}"])
    try:
        wait_for(lambda: scrape_metrics(port, host="127.0.0.2"), 60, "metrics on 127.0.0.2", rules)
        assert scrape_metrics(port, host="127.0.0.1") == {}  # bound to metrics.host only, not 0.0.0.0
        probe = mqtt_probe(mosquitto)
        watch = mqtt_probe(mosquitto, "watch")
        watch.subscribe(f"edgeline/v1/{unique_name}/m01/alert/#")
        now = time.time()
        results = [defect_result(unique_name, now + 0.2 * i, i) for i in range(4)]
        topic = f"edgeline/v1/{unique_name}/m01/result/cam1"
        for message in [*results, results[0], defect_result(unique_name, now - 60, 99)]:  # a duplicate, a late one
            probe.publish(topic, message.to_json())
        probe.publish(topic, b"{not json")
        alert = parse_message(watch.get(timeout=30).payload)
        done = {'edgeline_rules_messages_total{kind="result"}': 6.0, "edgeline_rules_dead_lettered_total": 1.0}
        wait_for(lambda: done.items() <= scrape_metrics(port, host="127.0.0.2").items(), 30, "all messages counted")
    finally:
        code = rules.stop()
    out, err = rules.output()
    assert code == 0, (out, err)
    assert (alert.rule, alert.state, alert.key) == ("surface-defect", "firing", "m01/cam1")
    assert "rules: alert firing: surface-defect on camera m01/cam1, severity warning, value 3" in err
    assert (f"rules {unique_name}: 6 messages, 1 decisions, 1 alerts, 1 commands, 1 dead-lettered, 1 late, "
            "1 duplicates") in out


def test_central_keeps_the_embedded_runners_alerts_and_an_operator_acknowledges_one(
        mosquitto: MosquittoBroker, mqtt_probe: Callable[..., Any], unique_name: str, tmp_path: Path) -> None:
    site = one_box_copy(tmp_path, unique_name)
    (tmp_path / "token").write_text("a-token-for-the-alert-store\n")
    server, base = start_central(tmp_path, site.read_text(), "--broker", f"{mosquitto.host}:{mosquitto.port}",
                                 env=client_env(EDGELINE_CENTRAL_TOKEN_FILE=str(tmp_path / "token")))
    auth = {"Authorization": "Bearer a-token-for-the-alert-store"}
    port = free_port()
    rules = Command(tmp_path, "rules", ["stream", "embedded", "-c", str(site), "--metrics-port", str(port),
                                        "--broker", f"{mosquitto.host}:{mosquitto.port}"])
    try:
        wait_for(lambda: scrape_metrics(port), 60, "the rules runner's metrics", rules)
        probe = mqtt_probe(mosquitto)
        now = time.time()
        for i in range(4):
            probe.publish(f"edgeline/v1/{unique_name}/m01/result/cam1", defect_result(unique_name, now + 0.2 * i, i).to_json())
        firing = wait_for(lambda: httpx.get(f"{base}/alerts", params={"state": "firing"}, headers=auth).json(), 30,
                          "the alert at central", rules)
        acked = httpx.post(f"{base}/alerts/{firing[0]['id']}/acknowledge", json={"by": "anna"}, headers=auth)
        standing = httpx.get(f"{base}/alerts", params={"state": "standing"}, headers=auth).json()
    finally:
        rules.stop()
        server.terminate()
        server.wait(10)
    assert (firing[0]["rule"], firing[0]["key"], firing[0]["line"]) == ("surface-defect", "m01/cam1", "line-1")
    assert acked.status_code == 200 and acked.json()["acknowledged_by"] == "anna" and standing == []
