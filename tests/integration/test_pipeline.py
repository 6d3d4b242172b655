"""The demo's pipeline over a real Mosquitto: injected defects and anomalies end as alerts.

Edge agents run the committed ONNX models on synthetic cameras and pumps; the embedded rules
engine consumes over MQTT. Cameras and pumps with nothing injected are the control: they must
raise no alert.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from edge.agent import EdgeAgent
from edgeline.config import SiteConfig, from_dict
from edgeline.services import MosquittoBroker, scrape_metrics
from stream.embedded import EmbeddedRulesRunner
from stream.messages import Alert, Command, Decision, Event, Result, parse_message
from stream.mqtt import MqttClient
from stream.settings import mqtt_settings
from stream.topics import deadletter_topic, site_filter

pytestmark = pytest.mark.integration

RUN_S = 60.0
"""Deadline for the injected faults' alerts: m2's pump calibrates on its first 160 samples (8 s at 20 Hz,
fast-start) and its first fault after that starts at sample 175 (seed 202)."""


def site_config(broker: MosquittoBroker, site: str, outbox_dir: Path) -> SiteConfig:
    def camera(cid: str, seed: int, defect_rate: float) -> dict[str, object]:
        return {"id": cid, "models": ["seg"],
                "source": {"type": "synthetic", "seed": seed, "defect_rate": defect_rate, "part_speed": 0.3}}

    def pump(seed: int, anomaly_rate: float) -> dict[str, object]:
        return {"id": "pump1", "model": "anomaly", "rate_hz": 20.0,
                "source": {"type": "synthetic", "seed": seed, "anomaly_rate": anomaly_rate}}

    return from_dict({
        "site": site,
        "broker": {"host": broker.host, "port": broker.port},
        "camera_defaults": {"fps": 5, "resolution": [320, 240]},
        "outbox": {"path": str(outbox_dir / "{machine}.sqlite")},
        "metrics": {"port": 0},
        "models": {"seg": {"path": "builtin:seg-synth-int8"}, "anomaly": {"path": "builtin:anomaly-skab", "profile": "fast-start"}},
        "machines": [
            {"id": "m1", "cameras": [camera("clean", 101, 0.0), camera("defective", 102, 0.9)],
             "sensors": [pump(201, 0.0)]},
            {"id": "m2", "cameras": [camera("clean", 103, 0.0)], "sensors": [pump(202, 0.1)]},
        ],
        "rules": [
            {"name": "surface-defect", "kind": "k_of_n", "metric": "defect_count",
             "condition": {"op": ">=", "value": 1}, "k": 2, "n": 3, "window_s": 5, "scope": "camera",
             "actions": [{"type": "alert"}, {"type": "command", "name": "snapshot"}]},
            {"name": "pump-anomaly", "kind": "k_of_n", "metric": "anomaly_level",
             "condition": {"op": ">=", "value": 1.0}, "k": 3, "n": 5, "window_s": 2, "scope": "machine",
             "severity": "critical"},
        ],
    })


def rules_runner(config: SiteConfig) -> EmbeddedRulesRunner:
    client = MqttClient(mqtt_settings(config.broker), client_id=f"{config.site}-rules")
    return EmbeddedRulesRunner(config.site, config.rules, client, lines=config.lines())


def test_injected_defects_and_anomalies_end_as_alerts(mosquitto: MosquittoBroker, unique_name: str,
                                                      mqtt_probe: Callable[..., object], tmp_path: Path) -> None:
    site = unique_name
    config = site_config(mosquitto, site, tmp_path)
    probe = mqtt_probe(mosquitto, "watch")
    probe.subscribe(site_filter(site))
    runner = rules_runner(config)
    agents = [EdgeAgent(config, machine.id, heartbeat_s=1.0) for machine in config.machines]
    expected = {("surface-defect", "m1/defective"), ("pump-anomaly", "m2")}
    runner.start(metrics_port=0)
    try:
        for agent in agents:
            agent.start()
        seen = watch_until_fired(probe, expected, timeout=RUN_S)
    finally:
        for agent in agents:
            agent.stop()
        time.sleep(0.5)
        scraped = scrape_metrics(runner.metrics_port)
        runner.stop()

    seen += drain(probe)
    alerts = [m for m in seen if isinstance(m, Alert) and m.state == "firing"]
    fired = {(a.rule, a.key) for a in alerts}
    assert ("surface-defect", "m1/defective") in fired
    assert ("pump-anomaly", "m2") in fired
    assert not {key for rule, key in fired if rule == "surface-defect"} & {"m1/clean", "m2/clean"}
    assert ("pump-anomaly", "m1") not in fired

    # The snapshot command went back to the edge, which applied it and attached a mask.
    commands = [m for m in seen if isinstance(m, Command)]
    assert any(c.name == "snapshot" and (c.machine, c.camera) == ("m1", "defective") for c in commands)
    assert any(isinstance(m, Event) and m.name == "command_applied" for m in seen)
    assert any(isinstance(m, Result) and m.camera == "defective" and m.frames[0].outputs[0].mask for m in seen)
    assert runner.metrics.count("dead_lettered") == 0
    emitted = {kind: scraped.get(f'edgeline_rules_emitted_total{{kind="{kind}"}}', 0.0)
               for kind in ("decision", "alert", "command")}
    published = Counter(m.KIND for m in seen if isinstance(m, (Decision, Alert, Command)))
    assert emitted == {kind: float(published[kind]) for kind in emitted}  # each one the runner sent, counted once
    evaluated = {kind: scraped[f'edgeline_rules_messages_total{{kind="{kind}"}}'] for kind in ("result", "anomaly")}
    assert all(count > 0 for count in evaluated.values())
    assert [scraped[f'edgeline_rules_latency_seconds_count{{kind="{kind}"}}'] for kind in evaluated] == list(
        evaluated.values())


def test_malformed_messages_are_dead_lettered_and_the_runner_goes_on(
        mosquitto: MosquittoBroker, unique_name: str, mqtt_probe: Callable[..., object], tmp_path: Path) -> None:
    site = unique_name
    config = site_config(mosquitto, site, tmp_path)
    probe = mqtt_probe(mosquitto, "watch")
    probe.subscribe(deadletter_topic(site))
    runner = rules_runner(config)
    runner.start(metrics_port=0)
    try:
        sender = mqtt_probe(mosquitto, "send")
        sender.publish(f"edgeline/v1/{site}/m1/result/cam1", b"{not json")
        sender.publish(f"edgeline/v1/{site}/m1/anomaly", json.dumps({"schema": "edgeline.anomaly/1"}))
        dead = [json.loads(m.payload) for m in probe.expect(2, timeout=10)]
        assert scrape_metrics(runner.metrics_port)["edgeline_rules_dead_lettered_total"] == 2
    finally:
        runner.stop()
    assert [d["source"] for d in dead] == [f"edgeline/v1/{site}/m1/result/cam1", f"edgeline/v1/{site}/m1/anomaly"]
    assert "JSON" in dead[0]["reason"] and "Field required" in dead[1]["reason"]
    assert runner.metrics.count("dead_lettered") == 2


def watch_until_fired(probe: object, expected: set[tuple[str, str]], timeout: float) -> list[object]:
    """Every message seen until each (rule, key) in ``expected`` has fired; fails at the deadline."""
    seen: list[object] = []
    fired: set[tuple[str, str]] = set()
    deadline = time.monotonic() + timeout
    while not expected <= fired:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"not fired within {timeout} s: {sorted(expected - fired)}"
        try:
            message = probe.get(timeout=min(1.0, remaining))
        except TimeoutError:
            continue
        if message.topic.endswith(("/status", "/_deadletter")):
            continue
        seen.append(parse_message(message.payload))
        if isinstance(seen[-1], Alert) and seen[-1].state == "firing":
            fired.add((seen[-1].rule, seen[-1].key))
    return seen


def drain(probe: object) -> list[object]:
    out = []
    while True:
        try:
            message = probe.get(timeout=1.0)
        except TimeoutError:
            return out
        if message.topic.endswith(("/status", "/_deadletter")):
            continue
        out.append(parse_message(message.payload))
