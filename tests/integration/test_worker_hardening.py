"""The Kafka worker against a real Kafka (issue 13): late drops show in its metrics (defect 3), and
an anomaly level that overflows to infinity neither crashes an agent nor loses its alert (defect 5)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from kafka import KafkaProducer

from stream.messages import Anomaly, Decision, Envelope, FrameResult, ModelOutput, Result
from tests.integration.streaming import WorkerProcess, read_messages, write_site

pytestmark = pytest.mark.integration

RULES = [
    {"name": "defects", "metric": "defect_ratio", "condition": {"op": ">=", "value": 0.05}, "scope": "camera",
     "actions": [{"type": "alert"}]},
    {"name": "pump", "metric": "anomaly_level", "condition": {"op": ">=", "value": 1.0}, "scope": "machine",
     "actions": [{"type": "alert"}]},
]
LATE_METRIC = "edgeline_worker_late_observations_total"


def result(site: str, ts: float, ratio: float, seq: int) -> Result:
    output = ModelOutput(model="seg", version="1", latency_ms=5.0, defect_ratio=ratio)
    return Result(site=site, machine="m01", camera="cam1", ts=ts, frames=[FrameResult(seq=seq, ts=ts, outputs=[output])])


def anomaly(site: str, ts: float, score: float, threshold: float) -> Anomaly:
    return Anomaly(site=site, machine="m02", ts=ts, group="pump1", seq=int(ts), model="lstm", version="1",
                   score=score, threshold=threshold, is_anomaly=score >= threshold)


@pytest.fixture
def worker_site(mosquitto, kafka, unique_name, tmp_path) -> Iterator[tuple[WorkerProcess, Callable[[Envelope], None]]]:
    """A worker of a fresh site, and a function that sends a message straight to its Kafka topic."""
    path, config = write_site(tmp_path, unique_name, mosquitto, kafka, RULES, [{"id": "m01"}, {"id": "m02"}])
    topics = config.stream.topics()
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap)
    worker = WorkerProcess(path, tmp_path / "workers").start()

    def send(message: Envelope) -> None:
        producer.send(topics.for_kind(message.KIND), key=message.machine.encode(), value=message.to_json()).get(30)

    try:
        yield worker, send
    finally:
        producer.close()
        worker.stop()


def decisions(kafka, site: str) -> list[Decision]:
    return [d for d in read_messages(kafka.bootstrap, f"{site}.decisions", idle_s=1.0, timeout=5)
            if isinstance(d, Decision)]


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, worker: WorkerProcess) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        worker.check_alive()
        assert time.monotonic() < deadline, f"{what} not within {timeout_s} s; log:\n{worker.tail()}"
        time.sleep(0.5)


def test_late_observations_are_counted_in_the_worker_metrics(worker_site, kafka, unique_name):
    worker, send = worker_site
    now = time.time()
    send(result(unique_name, now, 0.0, seq=0))
    worker.wait_consuming()
    for seq in range(1, 4):  # a minute behind the camera's clock, far past the allowed 5 s
        send(result(unique_name, now - 60, 0.0, seq=seq))
    wait_for(lambda: worker.metrics().get(LATE_METRIC) == 3.0, 60, "3 late observations counted", worker)


def test_an_anomaly_level_overflowing_to_infinity_fires_and_the_agent_keeps_going(worker_site, kafka, unique_name):
    worker, send = worker_site
    now = time.time()
    send(anomaly(unique_name, now, score=1e308, threshold=1e-300))  # level = inf before any cap
    send(anomaly(unique_name, now + 1, score=0.1, threshold=1.0))
    send(result(unique_name, now + 1, 0.5, seq=1))

    def fired() -> set[tuple[str, str]]:
        return {(d.rule, d.state) for d in decisions(kafka, unique_name)}

    wait_for(lambda: {("pump", "firing"), ("pump", "resolved"), ("defects", "firing")} <= fired(), 90,
             "the pump alert fired and resolved, the defects rule fired", worker)
    assert "the worker stops" not in " ".join(worker.tail(400).split())
