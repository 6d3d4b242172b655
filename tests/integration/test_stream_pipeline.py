"""Edge messages over a real Mosquitto, the bridge, a real Kafka and real worker processes:
decisions, alerts, commands back to the edge, liveness, dead letters, restarts and scale-out."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka import KafkaProducer

from stream.bridge import MqttKafkaBridge
from stream.embedded import EmbeddedRulesRunner
from stream.mqtt import MqttClient
from stream.messages import Alert, Command, Decision, Envelope, FrameResult, Heartbeat, ModelOutput, Result
from stream.rules import RulesEngine
from stream.settings import mqtt_settings
from stream.topics import KafkaTopics, command_topic, status_topic, topic_for
from tests.unit.stream.test_webhook import Receiver
from tests.integration.streaming import (WorkerProcess, group_lag, read_json, read_messages, read_topic, read_until_ids,
                                        wait_for, worker_group, write_site)

pytestmark = pytest.mark.integration

RULES = [
    {"name": "defects", "metric": "defect_ratio", "condition": {"op": ">=", "value": 0.05}, "scope": "camera",
     "actions": [{"type": "alert"}, {"type": "command", "name": "snapshot", "on": "firing"}]},
    {"name": "busy-machine", "kind": "k_of_n", "k": 3, "n": 5, "window_s": 10, "metric": "defect_ratio",
     "condition": {"op": ">=", "value": 0.05}, "scope": "machine", "actions": [{"type": "alert"}]},
]
LINE_RULE = {"name": "line-defects", "metric": "defect_ratio", "condition": {"op": ">=", "value": 0.5},
             "scope": "line", "actions": [{"type": "alert"}]}


def machines(count: int, line: str = "L1") -> list[dict]:
    return [{"id": f"m{i:02d}", "line": line} for i in range(1, count + 1)]


def result(site: str, machine: str, ts: float, ratio: float, camera: str = "cam1", seq: int = 0) -> Result:
    output = ModelOutput(model="seg", version="1", latency_ms=5.0, defect_ratio=ratio)
    return Result(site=site, machine=machine, camera=camera, ts=ts, frames=[FrameResult(seq=seq, ts=ts, outputs=[output])])


def defect_waves(site: str, machine_ids: list[str], steps: int, t0: float, phase: int = 0) -> list[Result]:
    """Per machine, windows of clean and defective frames (ratio 0.2), shifted per machine."""
    out = []
    for step in range(steps):
        for index, machine in enumerate(machine_ids):
            bad = ((step + 3 * index + phase) // 6) % 2 == 1
            out.append(result(site, machine, t0 + step * 0.2, 0.2 if bad else 0.0, seq=step))
    return out


def publish(probe, messages: list[Envelope], pause_s: float = 0.0) -> None:
    for message in messages:
        probe.publish(topic_for(message), message.to_json())
        if pause_s:
            time.sleep(pause_s)


def expected_outputs(site_config, messages: list[Envelope]) -> list[Envelope]:
    engine = RulesEngine(site_config.rules, lines=site_config.lines(),
                         allowed_lateness_s=site_config.engine.allowed_lateness_s)
    return [out for m in messages for out in engine.process(m)]


def ids(messages: list[Envelope], kind: type[Envelope]) -> set[str]:
    return {m.msg_id for m in messages if isinstance(m, kind)}


@pytest.fixture
def bridge_for():
    bridges: list[MqttKafkaBridge] = []

    def start(config) -> MqttKafkaBridge:
        bridge = MqttKafkaBridge(config.site, mqtt_settings(config.broker), config.stream.kafka,
                                 topics=config.stream.topics(), partitions=config.stream.partitions)
        bridge.start(metrics_port=0)
        bridges.append(bridge)
        return bridge

    yield start
    for bridge in bridges:
        bridge.stop()


@pytest.fixture
def workers(tmp_path):
    started: list[WorkerProcess] = []

    def start(config_path, name: str = "worker") -> WorkerProcess:
        worker = WorkerProcess(config_path, tmp_path / "workers", name).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def test_edge_messages_become_decisions_alerts_and_a_command_back_on_mqtt(
        mosquitto, kafka, mqtt_probe, unique_name, tmp_path, bridge_for, workers, request):
    receiver = Receiver([503]).__enter__()  # the alert webhook: first answer 503, then 200
    request.addfinalizer(lambda: receiver.__exit__(None, None, None))
    path, config = write_site(tmp_path, unique_name, mosquitto, kafka, RULES + [LINE_RULE], machines(2),
                              heartbeat_timeout_s=3.0, webhook={"url": receiver.url, "backoff_s": 0.1})
    topics = config.stream.topics()
    bridge_for(config)
    worker = workers(path)
    probe = mqtt_probe(mosquitto)
    probe.subscribe(command_topic(unique_name, "+", "+"))
    t0 = time.time()
    stream = [result(unique_name, "m01", t0 + i * 0.1, 0.6 if 5 <= i < 12 else 0.0, seq=i) for i in range(20)]
    publish(probe, stream)
    publish(probe, [Heartbeat(site=unique_name, machine="m02", ts=time.time(), uptime_s=1.0)])

    expected = expected_outputs(config, stream)  # one machine: the line stage sees the same order
    decisions = read_until_ids(kafka.bootstrap, topics.for_kind("decision"), ids(expected, Decision))
    worker.check_alive()
    assert ids(decisions, Decision) == ids(expected, Decision)
    assert {d.scope for d in decisions if isinstance(d, Decision)} == {"camera", "machine", "line"}
    line = [(d.state, d.ts) for d in decisions if isinstance(d, Decision) and d.scope == "line"]
    assert line == [("firing", stream[5].ts), ("resolved", stream[12].ts)]  # repartitioned by line

    command = Command.model_validate_json(probe.get(timeout=30).payload)
    assert (command.machine, command.name, command.camera) == ("m01", "snapshot", "cam1")

    # m02 fell silent after one heartbeat: offline alert; its next heartbeat resolves it
    offline = _wait_for_alert(kafka.bootstrap, topics, "machine-offline", "m02", "firing", timeout=30)
    assert offline.severity == "critical"
    publish(probe, [Heartbeat(site=unique_name, machine="m02", ts=time.time(), uptime_s=9.0)])
    _wait_for_alert(kafka.bootstrap, topics, "machine-offline", "m02", "resolved", timeout=30)
    # a last-will (retained status "offline") raises it at once
    probe.publish(status_topic(unique_name, "m01"), b"offline", retain=True)
    _wait_for_alert(kafka.bootstrap, topics, "machine-offline", "m01", "firing", timeout=30)
    probe.publish(status_topic(unique_name, "m01"), b"", retain=True)  # clear the retained status

    alerts = [a for a in read_messages(kafka.bootstrap, topics.for_kind("alert")) if isinstance(a, Alert)]
    assert ids(alerts, Alert) >= ids(expected, Alert)
    deadline = time.monotonic() + 30
    while {Alert.model_validate_json(b).msg_id for b in receiver.bodies[1:]} < ids(alerts, Alert):
        assert time.monotonic() < deadline, "not every alert reached the webhook"
        time.sleep(0.5)
    assert len(receiver.bodies) >= len(ids(alerts, Alert)) + 1  # the 503 was retried


def _wait_for_alert(bootstrap: str, topics: KafkaTopics, rule: str, key: str, state: str, timeout: float) -> Alert:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for alert in read_messages(bootstrap, topics.for_kind("alert"), idle_s=1.0, timeout=5):
            if isinstance(alert, Alert) and (alert.rule, alert.key, alert.state) == (rule, key, state):
                return alert
    raise AssertionError(f"no {rule} {state} alert for {key} within {timeout} s")


def test_restarting_the_worker_mid_stream_loses_no_decision_and_duplicates_no_alert(
        mosquitto, kafka, mqtt_probe, unique_name, tmp_path, bridge_for, workers):
    """The second worker rebuilds the tables from their changelogs, and reads on from the commits."""
    path, config = write_site(tmp_path, unique_name, mosquitto, kafka, RULES, machines(4))
    topics = config.stream.topics()
    bridge_for(config)
    first = workers(path, "first")
    probe = mqtt_probe(mosquitto)
    stream = defect_waves(unique_name, ["m01", "m02", "m03", "m04"], 120, time.time())
    half = len(stream) // 2
    publish(probe, stream[:half])
    first.wait_consuming()
    time.sleep(2.0)
    assert first.stop() == 0  # SIGTERM mid-stream: the worker checkpoints and commits on the way out
    second = workers(path, "second")
    wait_for(lambda: second.metrics().get("edgeline_worker_restored_records_total", 0) > 0, 60,
             "the second worker restored the first one's tables", [second])
    publish(probe, stream[half:])
    expected = expected_outputs(config, stream)
    want_decisions, want_alerts = ids(expected, Decision), ids(expected, Alert)
    assert len(want_alerts) >= 20
    decisions = read_until_ids(kafka.bootstrap, topics.for_kind("decision"), want_decisions)
    second.check_alive()
    alerts = read_until_ids(kafka.bootstrap, topics.for_kind("alert"), want_alerts, timeout=30)
    assert ids(decisions, Decision) == want_decisions, where_decisions_went(kafka.bootstrap, config, stream, decisions,
                                                                          expected)
    assert ids(alerts, Alert) == want_alerts
    transitions = Counter((a.rule, a.key, a.state, a.ts) for a in alerts if isinstance(a, Alert))
    assert max(transitions.values()) == 1, "an alert was raised twice for the same transition"


def where_decisions_went(bootstrap: str, config, sent: list[Result], got: list[Envelope],
                         expected: list[Envelope]) -> str:
    """For a failed equality: the decisions missing and extra (rule, key, state, seconds into the
    stream), whether every result sent reached Kafka, and what the workers left uncommitted."""
    t0, got_ids = sent[0].ts, ids(got, Decision)
    want = {m.msg_id: m for m in expected if isinstance(m, Decision)}

    def described(ms) -> str:
        return "; ".join(f"{m.rule} {m.key} {m.state} at {m.ts - t0:.1f} s"
                         for m in sorted(ms, key=lambda m: (m.key, m.ts))[:12])

    topics = config.stream.topics()
    in_kafka = {m.msg_id for m in read_messages(bootstrap, topics.for_kind("result"))}
    lag = group_lag(bootstrap, worker_group(config), [topics.for_kind("result"), topics.line_observations])
    return (f"missing: {described(want[i] for i in set(want) - got_ids)}\n"
            f"extra: {described(m for m in got if isinstance(m, Decision) and m.msg_id not in want)}\n"
            f"results sent {len(sent)}, in Kafka {len({m.msg_id for m in sent} & in_kafka)} "
            f"(last sent at {sent[-1].ts - t0:.1f} s); workers' uncommitted records {lag}")


def test_two_workers_split_the_machines_and_decide_as_the_embedded_runner(
        mosquitto, kafka, mqtt_probe, unique_name, tmp_path, bridge_for, workers):
    path, config = write_site(tmp_path, unique_name, mosquitto, kafka, RULES, machines(8))
    topics = config.stream.topics()
    bridge_for(config)
    embedded = EmbeddedRulesRunner(config.site, config.rules, MqttClient(mqtt_settings(config.broker),
                                   f"{unique_name}-embedded"), lines=config.lines(),
                                   allowed_lateness_s=config.engine.allowed_lateness_s)
    from_embedded: list[Envelope] = []
    embedded.listeners.append(from_embedded.append)
    embedded.start()
    try:
        pair = [workers(path, "a"), workers(path, "b")]
        probe = mqtt_probe(mosquitto)
        warmup = warm_up_until_both_consume(probe, unique_name, pair)
        results_topic = f'edgeline_worker_messages_total{{topic="{topics.for_kind("result")}"}}'
        before = [w.metrics().get(results_topic, 0.0) for w in pair]
        stream = defect_waves(unique_name, [f"m{i:02d}" for i in range(1, 9)], 60, time.time())
        publish(probe, stream)
        want = ids(expected_outputs(config, warmup + stream), Decision)
        decisions = read_until_ids(kafka.bootstrap, topics.for_kind("decision"), want)
    finally:
        embedded.stop()
    assert ids(decisions, Decision) == want == ids(from_embedded, Decision)
    shares = [w.metrics().get(results_topic, 0.0) - b for w, b in zip(pair, before)]
    assert sum(shares) >= len(stream) and min(shares) > 0, f"one worker did all the work: {shares}"


def warm_up_until_both_consume(probe, site: str, pair: list[WorkerProcess], timeout: float = 120.0) -> list[Result]:
    """Clean frames from m01..m08 (all 4 partitions) every 2 s until each worker has consumed some:
    then both have joined the group and hold their final share of the partitions."""
    sent: list[Result] = []
    deadline = time.monotonic() + timeout
    while not all(worker.consumed() > 0 for worker in pair):
        if time.monotonic() > deadline:
            raise TimeoutError("workers never both consumed: " + "\n".join(w.tail(20) for w in pair))
        for worker in pair:
            worker.check_alive()
        batch = [result(site, f"m{i:02d}", time.time(), 0.0, camera="warmup") for i in range(1, 9)]
        publish(probe, batch)
        sent += batch
        time.sleep(2.0)
    return sent


def test_restarting_the_bridge_mid_stream_loses_nothing(mosquitto, kafka, mqtt_probe, unique_name, tmp_path,
                                                        bridge_for):
    _, config = write_site(tmp_path, unique_name, mosquitto, kafka, [], machines(2))
    bridge = bridge_for(config)
    probe = mqtt_probe(mosquitto)
    t0 = time.time()
    stream = [result(unique_name, f"m0{1 + i % 2}", t0 + i * 0.01, 0.0, seq=i) for i in range(600)]
    publish(probe, stream[:200])
    bridge.stop()  # its persistent session keeps collecting at the broker
    publish(probe, stream[200:400])
    bridge_for(config)
    publish(probe, stream[400:])
    want = {m.msg_id for m in stream}
    got = read_until_ids(kafka.bootstrap, config.stream.topics().for_kind("result"), want, timeout=60)
    assert {m.msg_id for m in got} == want


def test_bad_input_is_dead_lettered_and_everything_keeps_running(
        mosquitto, kafka, mqtt_probe, unique_name, tmp_path, bridge_for, workers):
    path, config = write_site(tmp_path, unique_name, mosquitto, kafka, RULES, machines(1))
    topics = config.stream.topics()
    bridge = bridge_for(config)
    worker = workers(path)
    probe = mqtt_probe(mosquitto)
    topic = f"edgeline/v1/{unique_name}/m01/result/cam1"
    good = result(unique_name, "m01", time.time(), 0.0)
    bad = [b"not json", b'{"schema": "edgeline.result/1"}', result(unique_name, "m02", time.time(), 0.0).to_json()]
    junk: list[bytes] = []

    @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=300) | st.builds(lambda d: json.dumps(d).encode(),
                                               st.dictionaries(st.text(max_size=8), st.integers() | st.text())))
    def publish_junk(payload: bytes) -> None:
        probe.publish(topic, payload)
        junk.append(payload)

    for payload in bad:
        probe.publish(topic, payload)
    publish_junk()
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap)
    producer.send(topics.for_kind("result"), key=b"m01", value=b"\xff not a message").get(30)
    producer.close()
    publish(probe, [good])

    dead = read_json(kafka.bootstrap, topics.deadletter, until=len(bad) + len(junk) + 1, timeout=90)
    from_mqtt = [d for d in dead if d["source"] == topic]
    assert len(from_mqtt) == len(bad) + len(junk)
    assert any("on topic" in d["reason"] for d in from_mqtt)  # the m02 result on m01's topic
    assert [d["source"] for d in dead if d["source"] != topic] == [topics.for_kind("result")]  # by the worker
    assert bridge.metrics.dead_lettered._value.get() == len(bad) + len(junk)
    results = read_topic(kafka.bootstrap, topics.for_kind("result"), idle_s=2.0)
    assert good.to_json() in results
    worker.check_alive()
