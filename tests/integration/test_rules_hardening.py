"""The embedded rules runner over a real Mosquitto against messages that pass the schema but not
reality (issue 13): far-future timestamps, repeats after another machine's clock jumped, late
observations, levels that overflow, oversized messages, and its memory bound."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from edgeline.services import MosquittoBroker, scrape_metrics
from stream.embedded import EmbeddedRulesRunner
from stream.messages import (Alert, Anomaly, Decision, EncodedMask, Envelope, FrameResult, ModelOutput, Result,
                             parse_message)
from stream.mqtt import MqttClient, MqttSettings
from stream.rule_config import RuleConfig
from stream.topics import deadletter_topic, topic_for

pytestmark = pytest.mark.integration

DAY = 86_400.0
RULES = [
    RuleConfig(name="defects", metric="defect_ratio", condition={"op": ">=", "value": 0.5}, scope="camera"),
    RuleConfig(name="twice", kind="k_of_n", metric="defect_ratio", condition={"op": ">=", "value": 0.5}, k=2, n=5,
               window_s=600, scope="machine", match={"machines": ["m04"]}),
    RuleConfig(name="pump", metric="anomaly_level", condition={"op": ">=", "value": 1.0}, scope="machine"),
]


def result(site: str, machine: str, ts: float, ratio: float, **kw: object) -> Result:
    output = ModelOutput(model="seg", version="1", latency_ms=5.0, defect_ratio=ratio)
    return Result(site=site, machine=machine, camera="cam1", ts=ts, frames=[FrameResult(seq=0, ts=ts, outputs=[output])],
                  **kw)


def anomaly(site: str, ts: float, score: float, threshold: float) -> Anomaly:
    return Anomaly(site=site, machine="m02", ts=ts, group="pump1", seq=0, model="lstm", version="1", score=score,
                   threshold=threshold, is_anomaly=score >= threshold)


@pytest.fixture
def runner(mosquitto: MosquittoBroker, unique_name: str) -> Iterator[EmbeddedRulesRunner]:
    client = MqttClient(MqttSettings(host=mosquitto.host, port=mosquitto.port), client_id=f"{unique_name}-rules")
    runner = EmbeddedRulesRunner(unique_name, RULES, client, dedupe_ttl_s=60.0, dedupe_max_entries=50, max_states=4)
    runner.start(metrics_port=0)
    yield runner
    runner.stop()


@pytest.fixture
def watch(mosquitto: MosquittoBroker, unique_name: str, mqtt_probe: Callable[..., object]) -> object:
    probe = mqtt_probe(mosquitto, "watch")
    probe.subscribe(f"edgeline/v1/{unique_name}/+/decision")
    probe.subscribe(f"edgeline/v1/{unique_name}/+/alert")
    probe.subscribe(deadletter_topic(unique_name))
    return probe


@pytest.fixture
def send(mosquitto: MosquittoBroker, mqtt_probe: Callable[..., object]) -> Callable[..., None]:
    sender = mqtt_probe(mosquitto, "send")

    def publish(*messages: Envelope) -> None:
        for message in messages:
            sender.publish(topic_for(message), message.to_json())
    return publish


def collect(watch: object, until: Callable[[list[object]], bool], timeout: float = 15.0) -> list[object]:
    """What the watcher received (dead letters as dicts) until ``until`` holds; fails at the deadline."""
    seen: list[object] = []
    deadline = time.monotonic() + timeout
    while not until(seen):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out; received {seen}"
        try:
            message = watch.get(timeout=min(remaining, 0.5))
        except TimeoutError:
            continue
        seen.append(json.loads(message.payload) if message.topic.endswith("/_deadletter")
                    else parse_message(message.payload))
    return seen


def metric(runner: EmbeddedRulesRunner, name: str) -> float:
    return scrape_metrics(runner.metrics_port).get(name, 0.0)


def test_a_far_future_result_is_dead_lettered_and_later_decisions_all_come(
        runner: EmbeddedRulesRunner, unique_name: str, watch: object, send: Callable[..., None]) -> None:
    """Defect 1: after one result a year ahead, m01 got 0 of 20 expected decisions."""
    now = time.time()
    send(result(unique_name, "m01", now + 365 * DAY, 0.9))
    send(*[result(unique_name, "m01", now + i * 0.1, 0.9 if i % 2 == 0 else 0.0) for i in range(20)])
    seen = collect(watch, lambda s: sum(isinstance(m, Decision) for m in s) >= 20)
    dead = [m for m in seen if isinstance(m, dict)]
    assert [d["check"] for d in dead] == ["clock"]
    assert "ahead of the receiver's clock (limit 86400 s)" in dead[0]["reason"]
    decisions = [m for m in seen if isinstance(m, Decision)]
    assert [d.state for d in decisions] == ["firing", "resolved"] * 10
    assert metric(runner, 'edgeline_rules_invalid_messages_total{check="clock"}') == 1
    assert metric(runner, "edgeline_rules_dead_lettered_total") == 1


def test_another_machines_clock_jump_leaves_duplicate_detection_on(
        runner: EmbeddedRulesRunner, unique_name: str, watch: object, send: Callable[..., None]) -> None:
    """Defect 2: a jump of m09's clock made a msg_id sent three times on m04 fire a 2-of-5 rule."""
    now = time.time()
    send(result(unique_name, "m09", now + 3600, 0.0))  # an hour ahead: within the skew, past the dedupe TTL
    repeated = result(unique_name, "m04", now, 0.9)
    send(repeated, repeated, repeated)
    marker = result(unique_name, "m01", now + 1, 0.9)  # fires "defects" on m01 once all before it went through
    send(marker)
    seen = collect(watch, lambda s: any(isinstance(m, Decision) and m.key == "m01/cam1" for m in s))
    assert not [m for m in seen if isinstance(m, Decision) and m.rule == "twice"]
    assert runner.engine.stats.duplicates == 2
    assert metric(runner, "edgeline_rules_duplicates_total") == 2


def test_late_observations_are_counted(runner: EmbeddedRulesRunner, unique_name: str, watch: object,
                                       send: Callable[..., None]) -> None:
    """Defect 3: 120 observations dropped as late changed no edgeline_rules_* metric."""
    now = time.time()
    send(result(unique_name, "m01", now, 0.0))
    send(*[result(unique_name, "m01", now - 30 - i, 0.9) for i in range(12)])
    send(result(unique_name, "m01", now + 1, 0.9))
    collect(watch, lambda s: any(isinstance(m, Decision) for m in s))
    assert metric(runner, "edgeline_rules_late_observations_total") == 12


def test_an_overflowing_anomaly_level_still_fires_and_resolves(
        runner: EmbeddedRulesRunner, unique_name: str, watch: object, send: Callable[..., None]) -> None:
    """Defect 5: score 1e308 / threshold 1e-300 lost its alert (the Decision failed validation)."""
    now = time.time()
    send(anomaly(unique_name, now, 1e308, 1e-300), anomaly(unique_name, now + 1, 0.1, 1.0))
    seen = collect(watch, lambda s: sum(isinstance(m, Alert) for m in s) >= 2)
    assert [(a.state, a.value) for a in seen if isinstance(a, Alert)] == [("firing", 1e12), ("resolved", 0.1)]
    assert metric(runner, "edgeline_rules_dead_lettered_total") == 0


def test_an_oversized_result_is_dead_lettered_as_such(
        runner: EmbeddedRulesRunner, unique_name: str, watch: object, send: Callable[..., None]) -> None:
    noise = EncodedMask.encode(__import__("numpy").random.default_rng(0).integers(0, 2, (2000, 2000)))
    now = time.time()
    big = Result(site=unique_name, machine="m01", camera="cam1", ts=now, frames=[FrameResult(seq=0, ts=now, outputs=[
        ModelOutput(model="seg", version="1", latency_ms=1.0, defect_ratio=0.9, mask=noise)])])
    assert len(big.to_json()) > 1_000_000
    send(big)
    dead = collect(watch, lambda s: bool(s))
    assert dead[0]["check"] == "size" and "over the 900000 byte limit" in dead[0]["reason"]
    assert metric(runner, 'edgeline_rules_invalid_messages_total{check="size"}') == 1


def test_memory_stays_within_its_bounds_and_shows_them(
        runner: EmbeddedRulesRunner, unique_name: str, watch: object, send: Callable[..., None]) -> None:
    """Defect 15: dedupe ids and rule states are bounded by config, sizes and bounds in metrics."""
    now = time.time()
    send(*[result(unique_name, f"m{n % 8:02d}", now + n * 0.01, 0.0) for n in range(120)])
    send(result(unique_name, "m01", now + 5, 0.9))
    collect(watch, lambda s: any(isinstance(m, Decision) for m in s))
    scraped = scrape_metrics(runner.metrics_port)
    assert scraped['edgeline_rules_state_max_entries{store="dedupe"}'] == 50
    assert scraped['edgeline_rules_state_max_entries{store="rules"}'] == 4
    assert scraped['edgeline_rules_state_entries{store="dedupe"}'] == 50
    assert scraped['edgeline_rules_state_entries{store="rules"}'] == 4
    assert scraped['edgeline_rules_state_evicted_total{store="dedupe"}'] == 121 - 50
    assert scraped['edgeline_rules_state_evicted_total{store="rules"}'] > 0
    promtool = shutil.which("promtool")
    if promtool is not None:
        with urllib.request.urlopen(f"http://127.0.0.1:{runner.metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout + check.stderr
