"""Nothing the edge agent produces is lost: a 10 s broker outage mid-stream, and a kill -9 of the
agent with results still in its outbox (real Mosquitto, persistent sessions)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from edge.agent import EdgeAgent
from edgeline.config import from_dict
from edgeline.services import MosquittoBroker
from stream.messages import Result, parse_message
from stream.topics import mqtt_topic

pytestmark = pytest.mark.integration

EDGELINE = [sys.executable, "-m", "edgeline.cli"]


def site_dict(broker: MosquittoBroker, site: str, outbox: Path) -> dict:
    camera = {"models": ["seg"], "fps": 8, "source": {"type": "synthetic", "defect_rate": 0.5}}
    return {
        "site": site,
        "broker": {"host": broker.host, "port": broker.port, "reconnect_max_s": 1},
        "models": {"seg": {"path": "builtin:seg-synth-int8"}},
        "machines": [{"id": "m1", "cameras": [camera | {"id": "c1", "source": camera["source"] | {"seed": 1}},
                                              camera | {"id": "c2", "source": camera["source"] | {"seed": 2}}]}],
        "outbox": {"path": str(outbox / "{machine}.sqlite")},
        "metrics": {"port": 0},
    }


def collect_results(probe, want: Callable[[set[str]], bool], timeout: float, got: set[str] | None = None) -> set[str]:
    """Distinct result msg_ids until ``want(ids)`` or ``timeout``."""
    got = set() if got is None else got
    deadline = time.monotonic() + timeout
    while not want(got) and time.monotonic() < deadline:
        try:
            message = probe.get(timeout=max(0.05, min(1.0, deadline - time.monotonic())))
        except TimeoutError:
            continue
        parsed = parse_message(message.payload)
        if isinstance(parsed, Result):
            got.add(parsed.msg_id)
    return got


def test_ten_second_broker_outage_loses_no_result(restartable_mosquitto, mqtt_probe, unique_name, tmp_path):
    config = from_dict(site_dict(restartable_mosquitto, unique_name, tmp_path), base_dir=tmp_path)
    probe = mqtt_probe(restartable_mosquitto, clean_session=False)
    probe.subscribe(mqtt_topic(unique_name, "m1", "result", "+"))
    agent = EdgeAgent(config, "m1", heartbeat_s=1.0)
    agent.start()
    try:
        time.sleep(3)
        restartable_mosquitto._stop_process()  # SIGTERM; the probe's queued messages are saved
        time.sleep(10)
        held = agent.outbox.depth
        restartable_mosquitto.start()
        time.sleep(4)
    finally:
        agent.stop()
    produced = sum(c.results_published for c in agent.vision.camera_counters.values())
    assert held >= 10, "results made during the outage should have waited in the outbox"
    assert agent.outbox.depth == 0
    received = collect_results(probe, lambda ids: len(ids) >= produced, 30)
    assert len(received) == produced, f"{produced} results produced, {len(received)} distinct received"


def test_kill_9_with_results_in_the_outbox_then_restart_delivers_them(restartable_mosquitto, mqtt_probe, unique_name,
                                                                      tmp_path):
    config = tmp_path / "site.yaml"
    config.write_text(yaml.safe_dump(site_dict(restartable_mosquitto, unique_name, tmp_path)))
    probe = mqtt_probe(restartable_mosquitto, clean_session=False)
    probe.subscribe(mqtt_topic(unique_name, "m1", "result", "+"))
    command = [*EDGELINE, "edge", "run", "--config", str(config), "--machine", "m1", "--log-level", "warning"]
    edge = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        before = collect_results(probe, lambda ids: len(ids) >= 5, 60)
        assert len(before) >= 5, "the agent never published"
        restartable_mosquitto._stop_process()
        time.sleep(3)
        edge.kill()  # SIGKILL: no shutdown code runs
        edge.wait(timeout=10)
        with sqlite3.connect(tmp_path / "m1.sqlite") as db:
            stranded = {json.loads(payload)["msg_id"] for (payload,) in db.execute("SELECT payload FROM outbox")}
        assert len(stranded) >= 5
        restartable_mosquitto.start()
        edge = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        received = collect_results(probe, lambda ids: stranded <= ids, 60, set(before))
        assert stranded <= received, f"{len(stranded - received)} of {len(stranded)} stranded results never arrived"
    finally:
        edge.send_signal(signal.SIGTERM)
        output = edge.communicate(timeout=30)[0]
    assert edge.returncode == 0, output
    assert "Traceback" not in output
