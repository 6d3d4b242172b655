"""Prometheus metrics of one edge agent, in the agent's own registry (several agents may share a
process, as in the demo), served over HTTP by prometheus-client.

Inference latency and batch sizes are histograms observed where they happen; every count the
agent already keeps (frames, drops, results, outbox, sensors) is read at scrape time by a custom
collector instead of being counted twice. Names follow ``edgeline_edge_<name>_<unit>``; labels
are machine, camera, model, sensor group and outbox priority, never unbounded values.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.outbox import Priority

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from edge.agent import EdgeAgent

RATE_WINDOW_S = 10.0
"""How far back a heartbeat's rates (frames inferred per second) look."""
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)


class EdgeMetrics:
    """The registry of one agent, its histograms, and the HTTP endpoint."""

    def __init__(self, agent: EdgeAgent) -> None:
        self.registry = CollectorRegistry()
        self.inference_latency = Histogram(
            "edgeline_edge_inference_latency_seconds", "Wall time of one ONNX Runtime call (a micro-batch)",
            ["machine", "model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram(
            "edgeline_edge_inference_batch_frames", "Frames per inference call (cameras sharing a model)",
            ["machine", "model"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.inference_errors = Counter(
            "edgeline_edge_inference_errors", "Frames whose inference raised (no result published for them)",
            ["machine", "model"], registry=self.registry)
        self.registry.register(AgentCollector(agent))
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def observe_batch(self, machine: str, model: str, seconds: float, frames: int) -> None:
        self.inference_latency.labels(machine, model).observe(seconds)
        self.batch_size.labels(machine, model).observe(frames)

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (0: a free port); the port actually bound."""
        self._server, self._thread = start_http_server(port, host, registry=self.registry)
        return int(self._server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class RecentRate:
    """Events per second over the last ``window_s`` seconds (or since creation, if younger).

    ``add`` is called from one thread (inference), ``per_second`` from another (heartbeat).
    """

    def __init__(self, window_s: float = RATE_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._since = clock()
        self._times: deque[float] = deque()
        self._lock = threading.Lock()

    def add(self) -> None:
        now = self._clock()
        with self._lock:
            self._times.append(now)
            self._forget_before(now - self.window_s)

    def per_second(self) -> float:
        now = self._clock()
        with self._lock:
            self._forget_before(now - self.window_s)
            span = min(self.window_s, now - self._since)
            return len(self._times) / span if span > 0 else 0.0

    def _forget_before(self, cutoff: float) -> None:
        while self._times and self._times[0] <= cutoff:
            self._times.popleft()


class AgentCollector(Collector):
    """Reads the agent's own counters at scrape time."""

    def __init__(self, agent: EdgeAgent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        agent, machine = self.agent, self.agent.id
        per_camera = {
            "frames_captured": CounterMetricFamily("edgeline_edge_frames_captured", "Frames read from the camera",
                                                   labels=["machine", "camera"]),
            "frames_dropped": CounterMetricFamily("edgeline_edge_frames_dropped",
                                                  "Frames dropped by the full camera queue (oldest first)",
                                                  labels=["machine", "camera"]),
            "frames_inferred": CounterMetricFamily("edgeline_edge_frames_inferred", "Frames run through the models",
                                                   labels=["machine", "camera"]),
            "frames_gated": CounterMetricFamily("edgeline_edge_frames_gated",
                                                "Frames the change gate answered with the last result",
                                                labels=["machine", "camera"]),
            "results": CounterMetricFamily("edgeline_edge_results", "Frame results handed to the outbox (a grouped message holds several)",
                                           labels=["machine", "camera"]),
            "masks_refused": CounterMetricFamily("edgeline_edge_masks_refused", "Masks dropped from a result "
                                                 "because they would take it over the message size limit",
                                                 labels=["machine", "camera", "reason"]),
            "defects": CounterMetricFamily("edgeline_edge_defect_frames",
                                           "Inferred frames on which a model's image-level alarm fired",
                                           labels=["machine", "camera"]),
            "up": GaugeMetricFamily("edgeline_edge_camera_up", "1 while the camera delivers frames, else 0",
                                    labels=["machine", "camera"]),
            "shed": GaugeMetricFamily("edgeline_edge_camera_shed",
                                      "1 while the overload policy infers only one frame in a few",
                                      labels=["machine", "camera"]),
            "queue": GaugeMetricFamily("edgeline_edge_camera_queue_frames", "Frames waiting in the camera queue",
                                       labels=["machine", "camera"]),
        }
        for camera in agent.cameras:
            counters, labels = agent.camera_counters[camera.id], [machine, camera.id]
            per_camera["frames_captured"].add_metric(labels, camera.frames_captured)
            per_camera["frames_dropped"].add_metric(labels, camera.frames_dropped)
            per_camera["frames_inferred"].add_metric(labels, counters.frames_inferred)
            per_camera["frames_gated"].add_metric(labels, agent.gates[camera.id].gated)
            per_camera["results"].add_metric(labels, counters.results_published)
            per_camera["masks_refused"].add_metric([*labels, "size"], counters.masks_refused)
            per_camera["defects"].add_metric(labels, counters.defect_frames)
            per_camera["up"].add_metric(labels, 1.0 if camera.state == "ok" else 0.0)
            per_camera["queue"].add_metric(labels, camera.queue_depth())
            per_camera["shed"].add_metric(labels, 1.0 if camera.id in agent.shedder.shed else 0.0)
        yield from per_camera.values()
        yield from self._sensors()
        yield from self._transport()

    def _sensors(self) -> Iterator[Metric]:
        agent = self.agent
        samples = CounterMetricFamily("edgeline_edge_sensor_samples", "Sensor samples scored by the streaming model",
                                      labels=["machine", "group"])
        anomalies = CounterMetricFamily("edgeline_edge_anomalies", "Samples scored above the threshold",
                                        labels=["machine", "group"])
        invalid = CounterMetricFamily("edgeline_edge_sensor_invalid_scores", "Scores not published: not a valid "
                                      "anomaly message (e.g. a zero threshold)", labels=["machine", "group"])
        for group, counters in agent.sensor_counters.items():
            samples.add_metric([agent.id, group], counters.steps)
            anomalies.add_metric([agent.id, group], counters.anomalies)
            invalid.add_metric([agent.id, group], counters.invalid_scores)
        yield samples
        yield anomalies
        yield invalid
        yield from self._sensor_feeds()

    def _sensor_feeds(self) -> Iterator[Metric]:
        """What the sources delivered short of a clean sample: missing and out-of-range values (NaN to
        the model, which imputes them), time gaps in a replayed file, gateway payloads it could not use."""
        agent = self.agent
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
        for batch in agent.channel_batches.values():
            for group in batch.groups:
                missing, out_of_range = batch.counts(group)
                families["missing"].add_metric([agent.id, group], missing)
                families["out_of_range"].add_metric([agent.id, group], out_of_range)
        for group, source in agent.sensor_sources.items():
            families["gaps"].add_metric([agent.id, group], source.counters.gaps)
            families["bad"].add_metric([agent.id, group], source.counters.bad_payloads)
        yield from families.values()

    def _transport(self) -> Iterator[Metric]:
        agent = self.agent
        yield self._gauge("edgeline_edge_outbox_messages", "Messages stored, waiting for their PUBACK",
                          agent.outbox.depth)
        yield self._gauge("edgeline_edge_outbox_oldest_age_seconds",
                          "Age of the oldest message waiting in the outbox (0 when empty)", agent.outbox.oldest_age_s())
        dropped = CounterMetricFamily("edgeline_edge_outbox_dropped", "Messages the full outbox dropped",
                                      labels=["machine", "priority"])
        for priority in Priority:
            dropped.add_metric([agent.id, priority.name.lower()], agent.outbox.dropped[priority])
        yield dropped
        yield self._counter("edgeline_edge_publish_failures", "Publishes the MQTT client refused",
                            agent.publish_failures)
        yield self._gauge("edgeline_edge_mqtt_connected", "1 while connected to the broker",
                          1.0 if agent.mqtt.connected.is_set() else 0.0)

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=["machine"])
        family.add_metric([self.agent.id], value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=["machine"])
        family.add_metric([self.agent.id], value)
        return family
