"""Worker failover (issue 13, defect 6): after a ``kill -9`` of a worker, the worker started
in its place processes records within seconds, not after a 60 s session timeout (Faust's default,
which the first workers ran)."""

from __future__ import annotations

import time

import pytest
from kafka import KafkaProducer

from stream.messages import FrameResult, ModelOutput, Result
from tests.integration.streaming import WorkerProcess, write_site

pytestmark = pytest.mark.integration

RULE = {"name": "defects", "metric": "defect_ratio", "condition": {"op": ">=", "value": 0.05}, "scope": "camera",
        "actions": [{"type": "alert"}]}
FAILOVER_DEADLINE_S = 30.0
"""Well under the ~60 s a restarted worker used to wait; the measured gap is printed."""


def result(site: str, seq: int) -> Result:
    ts = time.time()
    output = ModelOutput(model="seg", version="1", latency_ms=5.0, defect_ratio=0.0)
    return Result(site=site, machine="m01", camera="cam1", ts=ts, frames=[FrameResult(seq=seq, ts=ts, outputs=[output])])


def feed_until_consumed(producer: KafkaProducer, topic: str, site: str, worker: WorkerProcess, timeout_s: float) -> float:
    """Send a result every 0.2 s until ``worker`` has consumed one; seconds it took."""
    started = time.monotonic()
    seq = 0
    while worker.consumed() == 0:
        worker.check_alive()
        assert time.monotonic() - started < timeout_s, f"{worker.name} consumed nothing in {timeout_s} s:\n{worker.tail()}"
        producer.send(topic, key=b"m01", value=result(site, seq).to_json())
        seq += 1
        time.sleep(0.2)
    return time.monotonic() - started


def test_a_worker_started_after_a_kill_9_processes_within_seconds(mosquitto, kafka, unique_name, tmp_path):
    path, config = write_site(tmp_path, unique_name, mosquitto, kafka, [RULE], [{"id": "m01", "line": "L1"}])
    topic = config.stream.topics().for_kind("result")
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap)
    first = WorkerProcess(path, tmp_path / "workers", "first").start()
    second = WorkerProcess(path, tmp_path / "workers", "second")
    try:
        feed_until_consumed(producer, topic, unique_name, first, timeout_s=120)
        first.proc.kill()  # kill -9: no LeaveGroup, the group only learns from the missing heartbeats
        first.proc.wait(10)
        second.start()
        gap_s = feed_until_consumed(producer, topic, unique_name, second, timeout_s=FAILOVER_DEADLINE_S)
        print(f"failover: the new worker processed its first record {gap_s:.1f} s after its start")
    finally:
        producer.close()
        second.stop()
        first.stop()
