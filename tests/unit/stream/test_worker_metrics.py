"""The worker's batch-fed histogram reads, on a scrape, as prometheus_client's own Histogram fed
the same values one at a time (dashboards and the bench read its buckets)."""

from __future__ import annotations

import random

import pytest

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from stream.worker import LATENCY_BUCKETS, BatchHistogram


def exposition(registry: CollectorRegistry) -> dict[str, float]:
    samples = [line.rpartition(" ") for line in generate_latest(registry).decode().splitlines()
               if not line.startswith("#") and "_created" not in line]
    return {name: float(value) for name, _, value in samples}


def test_a_batch_histogram_exposes_what_a_histogram_fed_one_value_at_a_time_does() -> None:
    rng = random.Random(7)
    batches = [("result", [rng.expovariate(4.0) for _ in range(rng.randint(1, 50))]) for _ in range(20)]
    batches += [("anomaly", [0.0, 0.01, 0.5, 30.0, 31.0])]  # on bucket bounds, and past the last one
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    batched = BatchHistogram("lat_seconds", "latency", "kind", LATENCY_BUCKETS)
    ours.register(batched)
    single = Histogram("lat_seconds", "latency", ["kind"], buckets=LATENCY_BUCKETS, registry=theirs)
    for kind, values in batches:
        batched.observe_many(kind, values)
        for value in values:
            single.labels(kind).observe(value)
    assert exposition(ours) == pytest.approx(exposition(theirs))  # the sums add in another order
