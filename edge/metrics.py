"""Prometheus metrics of one edge agent, in the agent's own registry (several agents may share a
process, as in the demo), served over HTTP by prometheus-client.

Inference latency and batch sizes are histograms observed where they happen; every count the
pipelines already keep (frames, drops, results, outbox, sensors) is read at scrape time by the
collectors they register (``VisionCollector``, ``SensingCollector``, ``TransportCollector``)
instead of being counted twice; the supervisor's restarts are ``edgeline_edge_restarts_total``.
Names follow ``edgeline_edge_<name>_<unit>``; labels are machine, camera, model, sensor group,
outbox priority and service, never unbounded values.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

RATE_WINDOW_S = 10.0
"""How far back a heartbeat's rates (frames inferred per second) look."""
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)


class EdgeMetrics:
    """The registry of one agent, its histograms, and the HTTP endpoint."""

    def __init__(self) -> None:
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
