"""The sensing pipeline of one machine: one sample per sensor group per tick, scored by the
streaming anomaly models (one batched LSTM step for all the groups of a model), published as
anomaly messages with their alarm spans."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import ValidationError

from edge.publisher import Publisher
from edge.sensors import ChannelBatch, MqttSensorFeed, SensorSource
from edge.settings import SensorGroupConfig
from models.package.anomaly import AnomalyScore, StreamingAnomalyModel
from stream.messages import AlarmSpan, Anomaly
from stream.service import Service, Supervisor

log = logging.getLogger(__name__)

RECENT_TICKS = 4096
"""Capture times of a sensor group's latest steps kept to stamp the start of an alarm event (the
runtime may open an event a few steps back); an older start is stamped with the oldest kept."""


@dataclass
class SensorCounters:
    steps: int = 0
    anomalies: int = 0
    score_last: float = 0.0
    threshold: float = 0.0
    invalid_scores: int = 0
    """Scores that could not become a valid Anomaly message (not published)."""
    recent_ts: np.ndarray = field(default_factory=lambda: np.zeros(RECENT_TICKS))
    """Capture time of step ``seq`` at ``seq % RECENT_TICKS``."""

    def ts_of(self, seq: int) -> float:
        """Capture time of one of the latest ``RECENT_TICKS`` steps (older: the oldest kept)."""
        return float(self.recent_ts[max(seq, self.steps - RECENT_TICKS) % RECENT_TICKS])


class SensingPipeline(Service):
    """The sensor groups of one machine that have a model, stepped at the fastest group's rate."""

    def __init__(self, site: str, machine: str, groups: Sequence[SensorGroupConfig],
                 anomaly_models: Mapping[str, StreamingAnomalyModel], sources: Mapping[str, SensorSource],
                 publisher: Publisher, supervisor: Supervisor | None = None) -> None:
        super().__init__(f"sensing:{machine}", supervisor=supervisor)
        self.site = site
        self.id = machine
        self.groups = list(groups)
        self.anomaly_models = dict(anomaly_models)
        self.sensor_sources = dict(sources)
        self.publisher = publisher
        self.sensor_counters = {group: SensorCounters() for group in self.sensor_sources}
        self.channel_batches = {
            name: ChannelBatch([s for s in self.groups if s.model == name], model.channels)
            for name, model in self.anomaly_models.items()
        }
        """Per anomaly model: its groups' samples in its channel order, valid ranges, missing counts."""
        self._unrated = {name: {s.id: s.rate_hz for s in self.groups if s.model == name}
                         for name in self.anomaly_models}
        if self.sensor_sources:
            self.add_loop("step", self._sensor_loop)

    def feeds(self) -> list[MqttSensorFeed]:
        """The sources that take their samples from MQTT (the agent subscribes them)."""
        return [source for source in self.sensor_sources.values() if isinstance(source, MqttSensorFeed)]

    def _sensor_loop(self) -> None:
        period = 1.0 / max(source.rate_hz for source in self.sensor_sources.values())
        next_due = time.monotonic()
        while not self.stopping.is_set():
            self.sensor_tick()
            next_due += period
            self.stopping.wait(max(0.0, next_due - time.monotonic()))

    def sensor_tick(self) -> None:
        """Read one sample per sensor group and score all groups of a model in one batched step."""
        ts = time.time()
        by_model: dict[str, dict[str, np.ndarray]] = {}
        for group in self.groups:
            source = self.sensor_sources.get(group.id)
            sample = source.next_sample() if source else None
            if sample is not None and group.model:
                by_model.setdefault(group.model, {})[group.id] = sample
        for name, samples in by_model.items():
            model = self.anomaly_models[name]
            scores = model.step(self.channel_batches[name].map(samples), self._new_rates(name, samples))
            for group, score in scores.items():
                self._publish_anomaly(model, group, score, ts)

    def _new_rates(self, model: str, samples: dict[str, np.ndarray]) -> dict[str, float] | None:
        """The sample rates of the groups stepping for the first time (the runtime keeps them)."""
        unrated = self._unrated[model]
        if not unrated:
            return None
        return {group: unrated.pop(group) for group in samples if group in unrated} or None

    def _publish_anomaly(self, model: StreamingAnomalyModel, group: str, score: AnomalyScore, ts: float) -> None:
        counters = self.sensor_counters[group]
        seq = counters.steps
        counters.recent_ts[seq % RECENT_TICKS] = ts
        counters.steps += 1
        counters.score_last = score.score
        counters.threshold = score.threshold
        counters.anomalies += int(score.is_anomaly)
        try:
            message = Anomaly(
                site=self.site, machine=self.id, ts=ts, group=group, seq=seq,
                model=model.name, version=model.version, score=score.score, threshold=score.threshold,
                is_anomaly=score.is_anomaly, channel_scores=score.channel_scores,
                top_channels=list(score.top_channels), alarm=alarm_span(counters, seq, score),
            )
        except ValidationError as exc:  # e.g. a zero threshold calibrated on a flat signal: skip, count, go on
            counters.invalid_scores += 1
            if counters.invalid_scores == 1:
                log.warning("edge:%s: %s: a score of model %s is not a valid anomaly message, not published "
                            "(counted in edgeline_edge_sensor_invalid_scores_total): %s", self.id, group, model.name,
                            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3]))
            return
        self.publisher.publish(message)


def alarm_span(counters: SensorCounters, seq: int, score: AnomalyScore) -> AlarmSpan | None:
    """The runtime's event in message terms: its steps become this group's seqs, stamped with their capture
    times (``score.step`` is ``seq``'s step in the runtime, which counts the group's steps too)."""
    event = score.event
    if event is None:
        return None
    start = seq - (score.step - event.start)
    end = None if event.end is None else seq - (score.step - event.end)
    return AlarmSpan(start_seq=max(start, 0), start_ts=counters.ts_of(max(start, 0)), end_seq=end,
                     end_ts=None if end is None else counters.ts_of(end), peak_level=event.peak,
                     channels=list(event.channels))


class SensingCollector(Collector):
    """Reads the sensing pipeline's own counters at scrape time."""

    def __init__(self, sensing: SensingPipeline) -> None:
        self.sensing = sensing

    def collect(self) -> Iterator[Metric]:
        sensing = self.sensing
        samples = CounterMetricFamily("edgeline_edge_sensor_samples", "Sensor samples scored by the streaming model",
                                      labels=["machine", "group"])
        anomalies = CounterMetricFamily("edgeline_edge_anomalies", "Samples scored above the threshold",
                                        labels=["machine", "group"])
        invalid = CounterMetricFamily("edgeline_edge_sensor_invalid_scores", "Scores not published: not a valid "
                                      "anomaly message (e.g. a zero threshold)", labels=["machine", "group"])
        for group, counters in sensing.sensor_counters.items():
            samples.add_metric([sensing.id, group], counters.steps)
            anomalies.add_metric([sensing.id, group], counters.anomalies)
            invalid.add_metric([sensing.id, group], counters.invalid_scores)
        yield samples
        yield anomalies
        yield invalid
        yield from self._sensor_feeds()

    def _sensor_feeds(self) -> Iterator[Metric]:
        """What the sources delivered short of a clean sample: missing and out-of-range values (NaN to
        the model, which imputes them), time gaps in a replayed file, gateway payloads it could not use."""
        sensing = self.sensing
        families = {
            "missing": CounterMetricFamily("edgeline_edge_sensor_missing_values", "Channel values missing or "
                                           "not a number (the model imputes them)", labels=["machine", "group"]),
            "out_of_range": CounterMetricFamily("edgeline_edge_sensor_out_of_range_values", "Channel values "
                                                "outside the channel's min/max (treated as missing)",
                                                labels=["machine", "group"]),
            "gaps": CounterMetricFamily("edgeline_edge_sensor_time_gaps", "Time steps longer than 1.5x the median "
                                        "in a replayed CSV", labels=["machine", "group"]),
            "bad": CounterMetricFamily("edgeline_edge_sensor_bad_payloads", "Gateway payloads skipped: not a JSON "
                                       "object with a number for any channel", labels=["machine", "group"]),
        }
        for batch in sensing.channel_batches.values():
            for group in batch.groups:
                missing, out_of_range = batch.counts(group)
                families["missing"].add_metric([sensing.id, group], missing)
                families["out_of_range"].add_metric([sensing.id, group], out_of_range)
        for group, source in sensing.sensor_sources.items():
            families["gaps"].add_metric([sensing.id, group], source.counters.gaps)
            families["bad"].add_metric([sensing.id, group], source.counters.bad_payloads)
        yield from families.values()
