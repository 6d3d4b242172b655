"""Sensor-group sources and the mapping of their channels onto a model's.

A source yields one sample per tick in its group's channel order (the site file's
``sensors[].channels``), NaN where a value is missing: the synthetic pump (any of SKAB's eight
channels), a CSV replay (columns by name, any separator, time gaps counted) or the latest sample a
sensor gateway published on MQTT (one JSON key per channel). :class:`ChannelBatch` puts the samples
of all groups of one model into the model's channel order in one numpy pass, turns values outside a
channel's valid range into NaN and counts missing and out-of-range values per group. Sources are
found by their ``type`` in the site file (:data:`SENSOR_SOURCES`).
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge.settings import (CsvSensorSource, MqttSensorSource, SensorChannel, SensorGroupConfig,
                           SyntheticSensorSource)
from models.package.series import gap_flags, read_series_csv
from models.package.synthetic import CHANNELS, SyntheticPump

log = logging.getLogger(__name__)


@dataclass
class FeedCounters:
    """What a source saw: time gaps it replayed (csv) and payloads it could not use (mqtt)."""

    gaps: int = 0
    bad_payloads: int = 0


class SensorSource(Protocol):
    rate_hz: float
    counters: FeedCounters

    def next_sample(self) -> np.ndarray | None: ...


class SyntheticSensorGroup:
    """The simulated pump, reduced to the group's channels."""

    def __init__(self, config: SyntheticSensorSource, rate_hz: float, channels: Sequence[str]) -> None:
        self._pump = SyntheticPump(seed=config.seed, rate_hz=rate_hz, anomaly_rate=config.anomaly_rate)
        self._columns = np.array([CHANNELS.index(name) for name in channels])
        self.rate_hz = rate_hz
        self.counters = FeedCounters()
        self._index = 0

    def next_sample(self) -> np.ndarray:
        values, _ = self._pump.sample(self._index)
        self._index += 1
        return values[self._columns]

    def injected(self) -> list[tuple[int, int]]:
        """The pump faults among the samples drawn so far, as (first, end) sample indices (end exclusive)."""
        return [(ep.start, ep.start + ep.length) for ep in self._pump.episodes(self._index) if ep.start < self._index]


class CsvReplay:
    """Replays a CSV file's channel columns (by name) at ``rate_hz x speed``; a row that follows a time
    gap counts one gap each time it is replayed."""

    def __init__(self, config: CsvSensorSource, rate_hz: float, channels: Sequence[SensorChannel],
                 base_dir: Path) -> None:
        series = read_series_csv(base_dir / config.path, columns=[c.column for c in channels],
                                 time_column=config.time_column, separator=config.separator)
        self._rows = series.values
        self._gaps = gap_flags(series.timestamps) if series.timestamps is not None else np.zeros(len(self._rows), bool)
        self._loop = config.loop
        self.rate_hz = rate_hz * config.speed
        self.counters = FeedCounters()
        self._index = 0

    def next_sample(self) -> np.ndarray | None:
        if self._index >= len(self._rows):
            if not self._loop:
                return None
            self._index = 0
        row = self._rows[self._index]
        self.counters.gaps += int(self._gaps[self._index])
        self._index += 1
        return row


class MqttSensorFeed:
    """The newest sample a sensor gateway published as a JSON object on ``topic``.

    Each tick takes the sample that arrived since the last one, or nothing (no new data: no model
    step); a gateway faster than ``rate_hz`` has its intermediate samples superseded. A key that is
    absent or not a finite number is a missing value (NaN); a payload that is not a JSON object with
    at least one of the channels' keys is counted as bad and skipped."""

    def __init__(self, config: MqttSensorSource, rate_hz: float, channels: Sequence[SensorChannel]) -> None:
        self.topic = config.topic
        self.fields = [channel.field for channel in channels]
        self.rate_hz = rate_hz
        self.counters = FeedCounters()
        self.received = 0
        self._latest: np.ndarray | None = None
        self._lock = threading.Lock()

    def on_message(self, message) -> None:  # noqa: ANN001 - paho message
        try:
            sample = self.parse(message.payload)
        except ValueError as exc:
            self.counters.bad_payloads += 1
            log.debug("sensor feed %s: bad payload skipped (%s)", self.topic, exc)
            return
        with self._lock:
            self._latest = sample
            self.received += 1

    def parse(self, payload: bytes) -> np.ndarray:
        """The channels' values in group order; ValueError for a payload that carries none of them."""
        data = json.loads(payload)  # JSONDecodeError is a ValueError
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        sample = np.array([_number(data.get(field)) for field in self.fields], np.float32)
        if np.isnan(sample).all():
            raise ValueError(f"none of the fields {', '.join(self.fields)} holds a number")
        return sample

    def next_sample(self) -> np.ndarray | None:
        with self._lock:
            sample, self._latest = self._latest, None
        return sample


def _number(value: Any) -> float:
    """A finite number (or numeric string) as float; NaN for anything else (absent, null, text, bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return math.nan
    try:
        number = float(value)
    except ValueError:
        return math.nan
    return number if math.isfinite(number) else math.nan


class ChannelBatch:
    """The groups of one model: their samples in the model's channel order, valid ranges applied.

    Built once per model from the groups' channel declarations (config check has made sure each
    group has exactly the model's channels, in any order). Per tick, one gather, one range test and
    one NaN count over all groups that have a sample, instead of a Python loop over channels."""

    def __init__(self, groups: Sequence[SensorGroupConfig], model_channels: Sequence[str]) -> None:
        self.groups = [group.id for group in groups]
        self._row = {group: row for row, group in enumerate(self.groups)}
        shape = (len(groups), len(model_channels))
        self._order = np.zeros(shape, np.intp)
        self._low, self._high = np.full(shape, -np.inf, np.float32), np.full(shape, np.inf, np.float32)
        for row, group in enumerate(groups):
            declared = {channel.name: (at, channel) for at, channel in enumerate(group.channels or [])}
            for col, name in enumerate(model_channels):
                at, channel = declared[name]
                self._order[row, col] = at
                self._low[row, col] = -np.inf if channel.min is None else channel.min
                self._high[row, col] = np.inf if channel.max is None else channel.max
        self._ranged = bool(np.isfinite(self._low).any() or np.isfinite(self._high).any())
        self._arange = np.arange(len(groups))[:, None]
        self.missing = np.zeros(len(groups), np.int64)
        self.out_of_range = np.zeros(len(groups), np.int64)

    def map(self, samples: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Group -> [C] float32 in model order; NaN where missing or out of range (both counted)."""
        if not samples:
            return {}
        rows = np.fromiter(map(self._row.__getitem__, samples), np.intp, len(samples))
        x = np.array(list(samples.values()), np.float32)[self._arange[: len(rows)], self._order[rows]]
        missing = np.isnan(x)
        if missing.any():
            self.missing[rows] += missing.sum(axis=1)
        if self._ranged:
            outside = (x < self._low[rows]) | (x > self._high[rows])  # NaN compares False: missing only
            if outside.any():
                self.out_of_range[rows] += outside.sum(axis=1)
                x[outside] = np.nan
        return dict(zip(samples, x))

    def counts(self, group: str) -> tuple[int, int]:
        """(missing, out_of_range) values of ``group`` so far."""
        row = self._row[group]
        return int(self.missing[row]), int(self.out_of_range[row])


SENSOR_SOURCES: dict[str, Callable[[Any, SensorGroupConfig, Sequence[SensorChannel], Path], SensorSource]] = {
    "synthetic": lambda source, group, channels, base_dir: SyntheticSensorGroup(source, group.rate_hz,
                                                                                [c.name for c in channels]),
    "mqtt": lambda source, group, channels, base_dir: MqttSensorFeed(source, group.rate_hz, channels),
    "csv": lambda source, group, channels, base_dir: CsvReplay(source, group.rate_hz, channels, base_dir),
}
"""Sensor source ``type`` in the site file -> (its source settings, the group, its channels, the site folder)
-> sensor source."""


def make_sensor_source(config: SensorGroupConfig, base_dir: Path) -> SensorSource:
    """The group's source, over ``config.channels`` (resolved by the site loader: declared, or the package's)."""
    channels = config.channels
    if channels is None:
        raise ValueError(f"sensor group {config.id}: channels not resolved (load the site with edgeline.config)")
    return SENSOR_SOURCES[config.source.type](config.source, config, channels, base_dir)
