"""The sensing pipeline without a broker (the synthetic pump, the builtin SKAB model, an in-memory
publisher), and supervision: a source that raises kills the loop's step, the supervisor restarts it,
counts it in ``edgeline_edge_restarts_total{service}`` and the agent's heartbeat reports it."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from edge.agent import EdgeAgent
from edge.publisher import MemoryPublisher
from edge.sensing import SensingCollector, SensingPipeline
from edge.sensors import SensorSource, make_sensor_source
from edge.settings import SensorGroupConfig
from edgeline.config import from_dict
from models.package import BUILTIN_PACKAGES, load_package
from models.package.anomaly import StreamingAnomalyModel
from models.package.signing import builtin_trusted_keys
from models.package.synthetic import CHANNELS
from stream.messages import Anomaly, Heartbeat, parse_message
from stream.service import Supervisor

STEP = "sensing:m1/step"


class FailsOnce:
    """A sensor source whose ``fail_at``-th read raises (a gateway library bug, a driver error), then
    delivers again."""

    def __init__(self, source: SensorSource, fail_at: int = 3) -> None:
        self.source = source
        self.rate_hz = source.rate_hz
        self.counters = source.counters
        self.reads = 0
        self.fail_at = fail_at

    def next_sample(self) -> np.ndarray | None:
        self.reads += 1
        if self.reads == self.fail_at:
            raise OSError("scripted: the sensor bus timed out")
        return self.source.next_sample()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(0.01)


def no_give_up(service: str, exc: BaseException) -> None:
    pytest.fail(f"the supervisor gave up on {service}: {exc}")


def test_a_step_that_raises_is_restarted_and_counted_and_the_stream_goes_on() -> None:
    group = SensorGroupConfig(id="pump1", model="skab", rate_hz=200, channels=list(CHANNELS))
    model = StreamingAnomalyModel(load_package(BUILTIN_PACKAGES / "anomaly-skab", trusted_keys=builtin_trusted_keys()))
    source = FailsOnce(make_sensor_source(group, Path(".")))
    registry = CollectorRegistry()
    supervisor = Supervisor("edge", registry=registry, backoff_first_s=0.01, on_give_up=no_give_up)
    publisher = MemoryPublisher()
    sensing = SensingPipeline("s1", "m1", [group], {"skab": model}, {"pump1": source}, publisher, supervisor)
    assert registry.get_sample_value("edgeline_edge_restarts_total", {"service": STEP}) is None
    sensing.start()
    try:
        wait_until(lambda: sensing.sensor_counters["pump1"].steps >= 10, "10 steps")
    finally:
        sensing.stop()
    assert source.reads > 10
    assert supervisor.restarts() == {STEP: 1}
    assert registry.get_sample_value("edgeline_edge_restarts_total", {"service": STEP}) == 1
    anomalies = publisher.of(Anomaly)
    assert [a.seq for a in anomalies] == list(range(len(anomalies))) and len(anomalies) >= 10  # no step lost
    assert {(a.group, a.model) for a in anomalies} == {("pump1", "anomaly-skab")}
    samples = {s.name: s.value for family in SensingCollector(sensing).collect() for s in family.samples}
    assert samples["edgeline_edge_sensor_samples_total"] == len(anomalies)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_agent_counts_a_restart_in_its_registry_and_reports_it_in_its_heartbeat(tmp_path: Path) -> None:
    """A whole agent (no broker is up: results wait in the outbox), its sensing loop killed by a fault."""
    config = from_dict({
        "site": "s1", "broker": {"host": "127.0.0.1", "port": closed_port()},
        "models": {"skab": {"path": "builtin:anomaly-skab"}, "seg": {"path": "builtin:seg-synth-int8"}},
        "machines": [{"id": "m1", "cameras": [{"id": "c1", "models": ["seg"], "fps": 5}],
                      "sensors": [{"id": "pump1", "model": "skab", "rate_hz": 100}]}],
        "outbox": {"path": str(tmp_path / "{machine}.sqlite")}, "metrics": {"port": 0},
    }, base_dir=tmp_path)
    agent = EdgeAgent(config, "m1", base_dir=tmp_path, heartbeat_s=60)
    faulty = agent.sensing.sensor_sources["pump1"] = FailsOnce(agent.sensing.sensor_sources["pump1"])
    registry = agent.metrics.registry
    agent.start(connect_timeout_s=0.1)
    try:
        wait_until(lambda: agent.sensing.sensor_counters["pump1"].steps >= 5 and faulty.reads > 5,
                   "steps after the fault")
        restarts = registry.get_sample_value("edgeline_edge_restarts_total", {"service": STEP})
        beat = parse_message(agent.heartbeats.heartbeat().to_json())
    finally:
        agent.stop()
    assert restarts == 1
    assert registry.get_sample_value("edgeline_edge_restarts_total", {"service": "vision:m1/infer"}) == 0
    assert isinstance(beat, Heartbeat) and beat.restarts[STEP] == 1
    assert set(beat.restarts) == {STEP, "vision:m1/infer", "capture:m1/c1", "heartbeat:m1/publish",
                                  "outbox:m1/forward", "ota:m1/apply", "evidence:m1/write"}
    assert not agent.supervisor.failed.is_set()
