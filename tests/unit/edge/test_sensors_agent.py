"""An agent's sensor path on a non-SKAB sensor set: a 3-channel package, a CSV mapped by column name,
missing and out-of-range values counted and exported, anomaly messages with top channels and alarms."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest

from edge.agent import EdgeAgent
from edge.sensing import SensorCounters, alarm_span
from models.package.anomaly import AlarmEvent, AnomalyScore
from edgeline.config import from_dict
from stream.messages import Anomaly, parse_message

pytest.importorskip("onnx")  # the tiny package's graph is built with onnx.helper
from tests.tiny_anomaly import write_tiny_anomaly_package  # noqa: E402

CHANNELS = ["load", "pressure", "motor_temp"]
ROWS = 60


def press_csv(path: Path) -> Path:
    """1 Hz rows (a 30 s gap after row 29), one empty cell (row 10) and one reading past its range (row 20)."""
    rng = np.random.default_rng(1)
    lines = ["ts;Load %;Pressure bar;Motor Temp"]
    for i in range(ROWS):
        t = 1_700_000_000 + i + (30 if i >= 30 else 0)
        load, pressure, temp = 50 + rng.normal(), 2 + 0.1 * rng.normal(), 40 + 0.01 * i
        cells = [f"{load:.3f}", "" if i == 10 else f"{pressure:.3f}", "900" if i == 20 else f"{temp:.3f}"]
        lines.append(";".join([str(t), *cells]))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def agent(tmp_path: Path):
    write_tiny_anomaly_package(tmp_path / "press-pkg", CHANNELS, name="press")
    press_csv(tmp_path / "press.csv")
    config = from_dict({
        "site": "s1", "signatures": {"require": False},
        "models": {"press": {"path": "press-pkg"}},
        "machines": [{"id": "m1", "sensors": [{
            "id": "press3", "model": "press", "rate_hz": 4,
            "source": {"type": "csv", "path": "press.csv"},
            "channels": [{"name": "motor_temp", "column": "Motor Temp", "unit": "degC", "min": -20, "max": 150},
                         {"name": "load", "column": "Load %"}, {"name": "pressure", "column": "Pressure bar"}]}]}],
        "outbox": {"path": str(tmp_path / "{machine}.sqlite")}, "metrics": {"port": 0},
    }, base_dir=tmp_path)
    agent = EdgeAgent(config, "m1", base_dir=tmp_path)
    yield agent
    agent.outbox.close()


def test_a_three_channel_csv_group_is_scored_and_its_value_problems_counted(agent: EdgeAgent) -> None:
    model = agent.sensing.anomaly_models["press"]
    assert model.channels == tuple(CHANNELS)
    calls: list[tuple[dict[str, np.ndarray], object]] = []
    step = model.step
    model.step = lambda samples, rates_hz=None: calls.append((dict(samples), rates_hz)) or step(samples, rates_hz)
    for _ in range(ROWS + 2):  # the file ends after ROWS: no sample, no step
        agent.sensing.sensor_tick()
    assert len(calls) == ROWS
    assert calls[0][1] == {"press3": 4.0} and all(rates is None for _, rates in calls[1:])  # the group's rate, once
    first = calls[0][0]["press3"]
    assert first[2] == pytest.approx(40.0) and 45 < first[0] < 55  # model order: load, pressure, motor_temp
    assert np.isnan(calls[10][0]["press3"][1]) and np.isnan(calls[20][0]["press3"][2])

    messages = [parse_message(p.payload) for p in agent.outbox.pending(limit=1000)]
    anomalies = [m for m in messages if isinstance(m, Anomaly)]
    assert [m.seq for m in anomalies] == list(range(ROWS))
    assert all(set(m.channel_scores) == set(CHANNELS) for m in anomalies)
    assert all(set(m.top_channels) <= set(CHANNELS) and len(m.top_channels) <= 3 for m in anomalies)
    assert anomalies[-1].top_channels  # scored after calibration: the runtime names its top channels

    metrics = generate_latest(agent.metrics.registry).decode()
    labels = '{group="press3",machine="m1"}'
    for name, value in (("missing_values", 1), ("out_of_range_values", 1), ("time_gaps", 1), ("bad_payloads", 0),
                        ("samples", ROWS)):
        assert f"edgeline_edge_sensor_{name}_total{labels} {float(value)}" in metrics, name


def test_an_alarm_event_becomes_seqs_and_capture_times() -> None:
    counters = SensorCounters()
    for seq in range(10):
        counters.recent_ts[seq] = 1000.0 + seq
    counters.steps = 10
    # the agent's seq 9 is the runtime's step 109 (the runtime counted 100 steps before, e.g. a swapped model)
    score = AnomalyScore(3.0, 1.0, True, {"a": 1.0}, ("a",), AlarmEvent(start=106, end=None, peak=3.5, channels=("a",)),
                         step=109)
    span = alarm_span(counters, 9, score)
    assert (span.start_seq, span.start_ts, span.end_seq, span.end_ts, span.peak_level, span.channels) == (
        6, 1006.0, None, None, 3.5, ["a"])
    ended = AnomalyScore(0.2, 1.0, False, {"a": 0.1}, (), AlarmEvent(start=106, end=109, peak=3.5, channels=("a",)),
                         step=109)
    span = alarm_span(counters, 9, ended)
    assert (span.start_seq, span.end_seq, span.end_ts) == (6, 9, 1009.0)
    assert alarm_span(counters, 9, AnomalyScore(0.2, 1.0, False, {}, step=109)) is None


def test_a_score_that_is_no_valid_message_is_counted_not_fatal(agent: EdgeAgent) -> None:
    model = agent.sensing.anomaly_models["press"]
    flat = AnomalyScore(0.0, 0.0, False, dict.fromkeys(CHANNELS, 0.0), step=0)  # zero threshold: level undefined
    agent.sensing._publish_anomaly(model, "press3", flat, time.time())
    agent.sensing._publish_anomaly(model, "press3", AnomalyScore(0.5, 1.0, False, dict.fromkeys(CHANNELS, 0.1), step=1),
                           time.time())
    assert agent.sensing.sensor_counters["press3"].invalid_scores == 1
    assert [parse_message(p.payload).seq for p in agent.outbox.pending()] == [1]
    assert 'edgeline_edge_sensor_invalid_scores_total{group="press3",machine="m1"} 1.0' in generate_latest(
        agent.metrics.registry).decode()
