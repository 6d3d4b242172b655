"""The agent's Prometheus endpoint: real counts after a few seconds of work, and a page that
``promtool check metrics`` (Debian's prometheus package) finds clean."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge.agent import EdgeAgent
from tests.conftest import edge_site, service_unavailable

pytestmark = pytest.mark.integration


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_endpoint_counts_real_work_and_passes_promtool(mosquitto, unique_name, tmp_path):
    config = edge_site(mosquitto, unique_name, tmp_path, [{"id": "m1", "cameras": [
        {"id": c, "models": ["seg"], "fps": 10, "source": {"type": "synthetic", "seed": i}}
        for i, c in enumerate(("c1", "c2"))],
        "sensors": [{"id": "pump1", "model": "anomaly", "rate_hz": 20, "source": {"type": "synthetic"}}]}],
        {"seg": {"path": "builtin:seg-synth-int8"}, "anomaly": {"path": "builtin:anomaly-skab"}})
    agent = EdgeAgent(config, "m1")
    agent.start()
    try:
        time.sleep(3)
        text = scrape(agent.metrics_port)
    finally:
        agent.stop()
    got = samples(text)
    for camera in ("c1", "c2"):
        labels = (("camera", camera), ("machine", "m1"))
        assert got[("edgeline_edge_frames_captured_total", labels)] >= 10
        assert got[("edgeline_edge_frames_inferred_total", labels)] >= 5
        assert got[("edgeline_edge_camera_up", labels)] == 1.0
    model = (("machine", "m1"), ("model", "seg-synth"))
    assert got[("edgeline_edge_inference_latency_seconds_count", model)] >= 5
    assert got[("edgeline_edge_inference_batch_frames_sum", model)] >= got[
        ("edgeline_edge_inference_latency_seconds_count", model)]
    assert got[("edgeline_edge_sensor_samples_total", (("group", "pump1"), ("machine", "m1")))] >= 20
    assert got[("edgeline_edge_mqtt_connected", (("machine", "m1"),))] == 1.0
    assert ("edgeline_edge_outbox_dropped_total", (("machine", "m1"), ("priority", "mask"))) in got
    promtool = shutil.which("promtool")
    if promtool is None:
        service_unavailable("promtool not installed (Debian package prometheus)")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), check.stdout + check.stderr
