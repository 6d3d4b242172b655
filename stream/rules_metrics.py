"""The rules engine's own counts as Prometheus metrics, for every runner (embedded, Kafka worker)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from stream.rules import EngineStats


class EngineStatsCollector(Collector):
    """The engine's own counts, read at scrape time: observations dropped as late or refused
    (``<prefix>_late_observations_total``, ``<prefix>_refused_observations_total``)."""

    def __init__(self, prefix: str, stats: Callable[[], list[EngineStats]]) -> None:
        self.prefix = prefix
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        yield CounterMetricFamily(f"{self.prefix}_late_observations", "Observations dropped as older than their "
                                  "rule key's clock minus the allowed lateness", value=sum(s.late for s in stats))
        yield CounterMetricFamily(f"{self.prefix}_refused_observations", "Observations refused before any state "
                                  "changed: a time or value not finite, or a time too far ahead of the receiver's "
                                  "clock", value=sum(s.refused for s in stats))
