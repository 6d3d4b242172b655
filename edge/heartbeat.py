"""The heartbeats of one machine: every ``interval_s`` (and once more on stop) its cameras' states
and rates, the outbox, the models running, their shadows and health, and the restarts of its
supervised loops."""

from __future__ import annotations

import time

import psutil

from edge.outbox import Outbox
from edge.publisher import Publisher
from edge.vision import VisionPipeline
from stream.messages import Heartbeat
from stream.service import Service, Supervisor


class HeartbeatPipeline(Service):
    """Publishes a heartbeat every ``interval_s``, and a last one when it stops."""

    def __init__(self, site: str, machine: str, interval_s: float, vision: VisionPipeline, outbox: Outbox,
                 supervisor: Supervisor, publisher: Publisher) -> None:
        super().__init__(f"heartbeat:{machine}", supervisor=supervisor)
        self.site = site
        self.id = machine
        self.interval_s = interval_s
        self.vision = vision
        self.outbox = outbox
        self.publisher = publisher
        self.started_at = time.monotonic()
        self.add_loop("publish", self._heartbeat_loop)

    def _heartbeat_loop(self) -> None:
        while not self.stopping.wait(self.interval_s):
            self.publisher.publish(self.heartbeat())

    def on_stop(self) -> None:
        self.publisher.publish(self.heartbeat())

    def heartbeat(self) -> Heartbeat:
        process = psutil.Process()
        vision = self.vision
        restarts = self.supervisor.restarts() if self.supervisor is not None else {}
        return Heartbeat(
            site=self.site, machine=self.id, ts=time.time(), uptime_s=time.monotonic() - self.started_at,
            cameras=[vision.camera_status(camera) for camera in vision.cameras],
            cpu_percent=process.cpu_percent(), rss_mb=process.memory_info().rss / 2**20,
            outbox_depth=self.outbox.depth, outbox_dropped=self.outbox.dropped_total,
            outbox_oldest_age_s=self.outbox.oldest_age_s(),
            models=vision.models_running(), shadow=vision.shadow_status(), health=vision.model_health(),
            restarts=restarts,
        )
