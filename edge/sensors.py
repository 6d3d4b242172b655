"""Sensor-group sources: each yields one 8-channel sample per tick (synthetic pump, CSV replay,
or the latest sample a sensor gateway published on MQTT)."""

from __future__ import annotations

import csv
import json
import logging
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from edge.synthetic import CHANNELS, SyntheticPump
from edgeline.config import CsvSensorSource, MqttSensorSource, SensorGroupConfig, SyntheticSensorSource

log = logging.getLogger(__name__)


class SensorSource(Protocol):
    rate_hz: float
    def next_sample(self) -> np.ndarray | None: ...


class SyntheticSensorGroup:
    def __init__(self, config: SyntheticSensorSource, rate_hz: float) -> None:
        self._pump = SyntheticPump(seed=config.seed, rate_hz=rate_hz, anomaly_rate=config.anomaly_rate)
        self.rate_hz = rate_hz
        self._index = 0

    def next_sample(self) -> np.ndarray:
        values, _ = self._pump.sample(self._index)
        self._index += 1
        return values


class CsvReplay:
    """Replays a SKAB-format CSV (``;``-separated, the eight SKAB channels by name)."""

    def __init__(self, config: CsvSensorSource, rate_hz: float, base_dir: Path) -> None:
        self._rows = read_skab_csv(base_dir / config.path)
        self._loop = config.loop
        self.rate_hz = rate_hz * config.speed
        self._index = 0

    def next_sample(self) -> np.ndarray | None:
        if self._index >= len(self._rows):
            if not self._loop:
                return None
            self._index = 0
        row = self._rows[self._index]
        self._index += 1
        return row


class MqttSensorFeed:
    """The newest sample a sensor gateway published as a JSON object on ``topic``.

    Each tick takes the sample that arrived since the last one, or nothing (no new data: no LSTM
    step); a gateway faster than ``rate_hz`` has its intermediate samples superseded. A payload
    that is not an object with the configured numeric fields is counted and skipped."""

    def __init__(self, config: MqttSensorSource, rate_hz: float) -> None:
        self.topic = config.topic
        self.fields = config.fields
        self.rate_hz = rate_hz
        self.received = 0
        self.bad = 0
        self._latest: np.ndarray | None = None
        self._lock = threading.Lock()

    def on_message(self, message) -> None:  # noqa: ANN001 - paho message
        try:
            data = json.loads(message.payload)
            sample = np.asarray([float(data[field]) for field in self.fields], np.float32)
            if not np.isfinite(sample).all():
                raise ValueError("non-finite value")
        except (ValueError, KeyError, TypeError) as exc:
            self.bad += 1
            log.debug("sensor feed %s: bad payload skipped (%s)", self.topic, exc)
            return
        with self._lock:
            self._latest = sample
            self.received += 1

    def next_sample(self) -> np.ndarray | None:
        with self._lock:
            sample, self._latest = self._latest, None
        return sample


def read_skab_csv(path: Path) -> np.ndarray:
    """The eight channels of a SKAB file as float32 rows, in :data:`CHANNELS` order."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle, delimiter=";")
        header = {name.strip().replace(" ", ""): name for name in reader.fieldnames or []}
        missing = [c for c in CHANNELS if c not in header]
        if missing:
            raise ValueError(f"{path}: missing SKAB columns {', '.join(missing)}")
        rows = [[float(record[header[c]]) for c in CHANNELS] for record in reader]
    return np.asarray(rows, dtype=np.float32).reshape(-1, len(CHANNELS))


def make_sensor_source(config: SensorGroupConfig, base_dir: Path) -> SensorSource:
    if isinstance(config.source, SyntheticSensorSource):
        return SyntheticSensorGroup(config.source, config.rate_hz)
    if isinstance(config.source, MqttSensorSource):
        return MqttSensorFeed(config.source, config.rate_hz)
    return CsvReplay(config.source, config.rate_hz, base_dir)
