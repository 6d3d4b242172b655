"""A new plant's path, end to end: ``edgeline models train-anomaly`` on its own 3-channel CSVs (not SKAB),
then a real edge agent runs the signed package on samples a gateway publishes over a real Mosquitto, and
the fault it was never shown opens one alarm event naming the channel that drove it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge.agent import EdgeAgent
from stream.messages import Anomaly, parse_message
from stream.topics import mqtt_topic
from tests.conftest import edge_site

pytestmark = pytest.mark.e2e

CHANNELS = ("flow", "pressure", "motor_temp")
FAULT = slice(900, 1100)
"""Rows of the evaluation file where the pressure sits 2 units high (labelled 1)."""


def press_line(rows: int, seed: int, start: float = 1_700_000_000.0) -> np.ndarray:
    """Three coupled channels at 1 Hz: a load cycle, the pressure it drives, a slowly warming motor."""
    rng = np.random.default_rng(seed)
    t = np.arange(rows, dtype=np.float64)
    flow = 10 + np.sin(2 * np.pi * t / 120) + 0.1 * rng.standard_normal(rows)
    pressure = 3 + 0.5 * (flow - 10) + 0.05 * rng.standard_normal(rows)
    motor_temp = 40 + 0.0002 * t + 0.05 * rng.standard_normal(rows)
    return np.stack([start + t, flow, pressure, motor_temp], 1)


def write_csv(path: Path, table: np.ndarray, labels: np.ndarray | None = None) -> Path:
    header = "time," + ",".join(CHANNELS) + (",fault" if labels is not None else "")
    lines = [header]
    for i, row in enumerate(table):
        cells = [f"{row[0]:.0f}", *(f"{v:.4f}" for v in row[1:])] + ([str(int(labels[i]))] if labels is not None else [])
        lines.append(",".join(cells))
    path.write_text("\n".join(lines) + "\n")
    return path


def evaluation_table() -> tuple[np.ndarray, np.ndarray]:
    table = press_line(1500, seed=7)
    table[FAULT, 2] += 2.0
    labels = np.zeros(len(table), bool)
    labels[FAULT] = True
    return table, labels


def train(tmp_path: Path) -> dict:
    (tmp_path / "data").mkdir()
    normal = write_csv(tmp_path / "data" / "normal.csv", press_line(6000, seed=1))
    table, labels = evaluation_table()
    labelled = write_csv(tmp_path / "data" / "with-fault.csv", table, labels)
    done = subprocess.run(
        [sys.executable, "-m", "edgeline.cli", "models", "train-anomaly", str(normal), str(labelled), "--name", "press3",
         "--label-column", "fault", "--out", str(tmp_path / "packages"), "--key", str(tmp_path / "plant.key"),
         "--steps", "150", "--json"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_a_model_trained_on_a_plants_own_csvs_alarms_on_its_fault_in_a_real_agent(mosquitto, mqtt_probe,
                                                                                   unique_name, tmp_path):
    report = train(tmp_path)
    assert report["channels"] == list(CHANNELS) and report["labelled_files"] == 1
    assert report["metrics"]["onnx_parity_max_abs_diff"] < 1e-4
    package = Path(report["folder"])
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["preprocess"]["channels"] == list(CHANNELS) and manifest["signature"]["key_id"] == report["key_id"]

    site, feed = unique_name, f"{unique_name}/gateway/press3"
    config = edge_site(mosquitto, site, tmp_path, [{"id": "m1", "sensors": [
        {"id": "press3", "model": "press", "rate_hz": 400, "channels": list(CHANNELS),
         "source": {"type": "mqtt", "topic": feed}}]}],
        {"press": {"path": str(package)}}, signatures={"trusted_keys": [str(tmp_path / "plant.key.pub")]})
    probe = mqtt_probe(mosquitto)
    probe.subscribe(mqtt_topic(site, "m1", "anomaly"))
    table, _ = evaluation_table()
    agent = EdgeAgent(config, "m1")
    agent.start()
    try:
        fault_published_at = publish_rows(probe, feed, table, agent)
        scores = collect_anomalies(probe, len(table))
    finally:
        agent.stop()
    before = [s for s in scores if s.ts < fault_published_at]
    alarmed = [s for s in scores if s.is_anomaly]
    assert before and not any(s.is_anomaly for s in before), "an alarm on normal rows"
    assert alarmed, "the fault raised no alarm"
    led_by_pressure = sum(s.top_channels[0] == "pressure" for s in alarmed)
    assert led_by_pressure > len(alarmed) / 2, [s.top_channels for s in alarmed]
    closed = [s.alarm for s in scores if s.alarm is not None and s.alarm.end_seq is not None]
    assert closed, "the alarm never ended"
    assert closed[0].channels[0] == "pressure" and closed[0].peak_level > 1  # the channel that drove it, at its peak


def publish_rows(probe, topic: str, table: np.ndarray, agent: EdgeAgent) -> float:  # noqa: ANN001 - MqttProbe
    """Publish every row as a gateway would, one JSON object per sample, each once the agent has stepped the one
    before (so none is superseded, however loaded the machine); returns the wall time the first fault row went out."""
    counters, fault_at = agent.sensing.sensor_counters["press3"], 0.0
    for i, row in enumerate(table):
        if i == FAULT.start:
            fault_at = time.time()
        probe.publish(topic, json.dumps(dict(zip(CHANNELS, map(float, row[1:])))))
        wait_for(lambda: counters.steps > i, f"row {i} stepped")
    return fault_at


def wait_for(condition, what: str, timeout: float = 10.0) -> None:  # noqa: ANN001 - a callable
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.001)


def collect_anomalies(probe, count: int, timeout: float = 30.0) -> list[Anomaly]:  # noqa: ANN001
    """The first ``count`` anomaly messages."""
    scores: list[Anomaly] = []
    deadline = time.monotonic() + timeout
    while len(scores) < count:
        message = parse_message(probe.get(timeout=max(0.1, deadline - time.monotonic())).payload)
        if isinstance(message, Anomaly):
            scores.append(message)
    return scores
