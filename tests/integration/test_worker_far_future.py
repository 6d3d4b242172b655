"""A real worker on a real Kafka: a result a year ahead must not silence its machine (issue
13, defect 1: m01 got 0 of 20 expected decisions, and the worker never recovered, its rule state
being in Kafka). Records go straight to Kafka, as a bridge without checks would have put them."""

from __future__ import annotations

import time

import pytest
from kafka import KafkaProducer

from stream.kafka import ensure_topics
from stream.messages import Decision, Envelope, FrameResult, ModelOutput, Result
from tests.integration.streaming import WorkerProcess, read_json, read_messages, write_site

pytestmark = pytest.mark.integration

DAY = 86_400.0
RULES = [
    {"name": "defects", "metric": "defect_ratio", "condition": {"op": ">=", "value": 0.5}, "scope": "camera"},
]


def result(site: str, ts: float, ratio: float) -> Result:
    output = ModelOutput(model="seg", version="1", latency_ms=5.0, defect_ratio=ratio)
    return Result(site=site, machine="m01", camera="cam1", ts=ts, frames=[FrameResult(seq=0, ts=ts, outputs=[output])])


def test_a_far_future_result_is_dead_lettered_and_every_later_decision_comes(
        mosquitto, kafka, unique_name, tmp_path):
    path, config = write_site(tmp_path, unique_name, mosquitto, kafka, RULES,
                              [{"id": "m01", "line": "L1"}])
    topics = config.stream.topics()
    ensure_topics(kafka.bootstrap, topics, config.stream.partitions)
    now = time.time()
    poison = result(unique_name, now + 365 * DAY, 0.9)
    stream: list[Envelope] = [poison, *[result(unique_name, now + i * 0.1, 0.9 if i % 2 == 0 else 0.0)
                                        for i in range(20)]]
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap)
    for message in stream:
        producer.send(topics.for_kind(message.KIND), key=message.machine.encode(), value=message.to_json())
    producer.flush(30)
    producer.close()
    worker = WorkerProcess(path, tmp_path / "workers").start()
    try:
        deadline = time.monotonic() + 120
        decisions: list[Decision] = []
        while len(decisions) < 20 and time.monotonic() < deadline:
            worker.check_alive()
            decisions = [d for d in read_messages(kafka.bootstrap, topics.for_kind("decision"), idle_s=1.0, timeout=5)
                         if isinstance(d, Decision)]
        dead = read_json(kafka.bootstrap, topics.deadletter, until=1, timeout=10)
        log = worker.tail()
    finally:
        assert worker.stop() == 0
    assert [d.state for d in decisions if d.rule == "defects"] == ["firing", "resolved"] * 10, log
    assert len(dead) == 1 and "ahead of the receiver's clock" in dead[0]["reason"]
