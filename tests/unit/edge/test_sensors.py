"""Sensor sources on any channel set, and the mapping of group channels onto a model's channels."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edge.sensors import ChannelBatch, CsvReplay, MqttSensorFeed, SyntheticSensorGroup, make_sensor_source
from edge.settings import (CsvSensorSource, MqttSensorSource, SensorChannel, SensorGroupConfig,
                           SyntheticSensorSource)
from models.package.synthetic import CHANNELS, SyntheticPump


def group(gid: str, channels: list, source: dict | None = None) -> SensorGroupConfig:
    return SensorGroupConfig.model_validate({"id": gid, "channels": channels,
                                             "source": source or {"type": "mqtt", "topic": "t"}})


def as_list(x: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in x]


# ---------------------------------------------------------------- channel batch


def test_channel_batch_puts_each_group_in_model_order_and_applies_ranges() -> None:
    model = ["load", "pressure", "temp"]
    a = group("a", ["temp", "load", "pressure"])
    b = group("b", [{"name": "load", "min": 0, "max": 10}, "pressure", {"name": "temp", "max": 90}])
    batch = ChannelBatch([a, b], model)
    out = batch.map({"a": np.array([70.0, 1.0, 2.0], np.float32), "b": np.array([11.0, np.nan, 95.0], np.float32)})
    assert as_list(out["a"]) == [1.0, 2.0, 70.0]
    assert as_list(out["b"]) == [None, None, None]  # 11 > max, NaN missing, 95 > max
    assert batch.counts("a") == (0, 0) and batch.counts("b") == (1, 2)
    out = batch.map({"b": np.array([-1.0, 3.0, 80.0], np.float32)})  # only one group this tick
    assert list(out) == ["b"] and as_list(out["b"]) == [None, 3.0, 80.0]
    assert batch.counts("b") == (1, 3) and batch.counts("a") == (0, 0)
    assert batch.map({}) == {}


def test_channel_batch_with_64_channels_and_one() -> None:
    names = [f"ch{i}" for i in range(64)]
    batch = ChannelBatch([group("g", names[::-1])], names)
    (x,) = batch.map({"g": np.arange(64, dtype=np.float32)}).values()
    assert x.tolist() == list(range(63, -1, -1))
    single = ChannelBatch([group("t", [{"name": "value", "min": -40, "max": 125}])], ["value"])
    assert as_list(single.map({"t": np.array([20.5], np.float32)})["t"]) == [20.5]
    assert as_list(single.map({"t": np.array([999.0], np.float32)})["t"]) == [None]
    assert single.counts("t") == (0, 1)


# ---------------------------------------------------------------- sources


def test_csv_replay_by_column_name_nab_style_with_gaps(tmp_path: Path) -> None:
    times = ["2014-04-01 00:00:00", "2014-04-01 00:05:00", "2014-04-01 00:10:00", "2014-04-01 01:00:00",
             "2014-04-01 01:05:00"]
    (tmp_path / "cpu.csv").write_text("timestamp,value\n" + "".join(f"{t},{i}.5\n" for i, t in enumerate(times)))
    source = CsvSensorSource(path=Path("cpu.csv"), loop=True, speed=10)
    replay = CsvReplay(source, 2.0, [SensorChannel(name="cpu", column="value")], tmp_path)
    assert replay.rate_hz == 20.0
    rows = [replay.next_sample() for _ in range(7)]
    assert [float(r[0]) for r in rows] == [0.5, 1.5, 2.5, 3.5, 4.5, 0.5, 1.5]  # loops
    assert replay.counters.gaps == 1  # 00:10 -> 01:00, once per pass
    for _ in range(3):
        replay.next_sample()
    assert replay.counters.gaps == 2


def test_csv_replay_skab_style_semicolons_missing_cells_and_the_end(tmp_path: Path) -> None:
    (tmp_path / "pump.csv").write_text("datetime;Current;Volume Flow RateRMS;anomaly\n"
                                       "2020-03-09 10:14:33;1.3;32.0;0\n2020-03-09 10:14:34;;31.0;0\n")
    channels = [SensorChannel(name="VolumeFlowRateRMS"), SensorChannel(name="Current")]
    replay = CsvReplay(CsvSensorSource(path=Path("pump.csv")), 1.0, channels, tmp_path)
    assert as_list(replay.next_sample()) == [32.0, pytest.approx(1.3)]
    assert as_list(replay.next_sample()) == [31.0, None]
    assert replay.next_sample() is None  # no loop: the end


def test_mqtt_feed_takes_any_fields_missing_keys_become_nan() -> None:
    channels = [SensorChannel(name="load"), SensorChannel(name="pressure", field="p_bar"), SensorChannel(name="temp")]
    feed = MqttSensorFeed(MqttSensorSource(topic="gw/press3"), 5.0, channels)
    assert feed.fields == ["load", "p_bar", "temp"]
    deliver = lambda payload: feed.on_message(SimpleNamespace(payload=payload))  # noqa: E731
    deliver(json.dumps({"load": 0.7, "p_bar": "2.5", "temp": 41, "extra": "ignored"}).encode())
    assert as_list(feed.next_sample()) == [pytest.approx(0.7), 2.5, 41.0]
    assert feed.next_sample() is None  # nothing new: no step
    deliver(json.dumps({"load": 0.8, "temp": None}).encode())
    deliver(json.dumps({"load": 0.9, "p_bar": True, "temp": "hot"}).encode())  # newest wins
    assert as_list(feed.next_sample()) == [pytest.approx(0.9), None, None]
    for bad in (b"not json", b"[1, 2, 3]", json.dumps({"other": 1}).encode(), json.dumps({"load": "x"}).encode()):
        deliver(bad)
    assert feed.counters.bad_payloads == 4 and feed.received == 3 and feed.next_sample() is None


def test_synthetic_group_gives_the_declared_pump_channels_in_their_order() -> None:
    source = SyntheticSensorGroup(SyntheticSensorSource(seed=3), 10.0, ["Voltage", "Current"])
    full, _ = SyntheticPump(seed=3, rate_hz=10.0, anomaly_rate=0.01).sample(0)
    assert source.next_sample().tolist() == [full[CHANNELS.index("Voltage")], full[CHANNELS.index("Current")]]


def test_a_group_without_resolved_channels_is_refused() -> None:
    with pytest.raises(ValueError, match="sensor group g: channels not resolved"):
        make_sensor_source(SensorGroupConfig(id="g"), Path("."))


def test_every_sensor_source_type_has_a_factory(tmp_path: Path) -> None:
    from typing import get_args

    from edge.sensors import SENSOR_SOURCES
    from edge.settings import SensorSource

    kinds = [get_args(model.model_fields["type"].annotation)[0] for model in get_args(get_args(SensorSource)[0])]
    assert sorted(SENSOR_SOURCES) == sorted(kinds)
    (tmp_path / "p.csv").write_text("Current\n1.0\n")
    made = {kind: type(make_sensor_source(group("g", ["Current"], source), tmp_path))
            for kind, source in [("synthetic", {"type": "synthetic"}), ("mqtt", {"type": "mqtt", "topic": "t"}),
                                 ("csv", {"type": "csv", "path": "p.csv", "time_column": None})]}
    assert made == {"synthetic": SyntheticSensorGroup, "mqtt": MqttSensorFeed, "csv": CsvReplay}
