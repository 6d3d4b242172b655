"""Kafka helpers shared by the bridge, the worker and the benchmarks (kafka-python)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from kafka import KafkaAdminClient, KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError

from stream.topics import KafkaTopics

log = logging.getLogger(__name__)


def ensure_topics(bootstrap: str, topics: KafkaTopics, partitions: int = 4, replication: int = 1,
                  timeout_s: float = 60.0, client_id: str = "edgeline-admin",
                  configured: Mapping[str, Mapping[str, str]] | None = None) -> None:
    """Create the pipeline's topics that do not exist yet, and those of ``configured`` (name ->
    topic configs, e.g. the worker's compacted changelogs); wait for the broker up to ``timeout_s``.

    Partitions bound how many workers share the load: one machine's messages stay on one
    partition (key = machine id), so ``partitions`` is the most workers that can be busy."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id=client_id)
            break
        except KafkaError as exc:
            if time.monotonic() > deadline:
                raise ConnectionError(f"Kafka at {bootstrap} not reachable after {timeout_s:.0f} s: {exc}") from exc
            time.sleep(1.0)
    try:
        existing = set(admin.list_topics())
        wanted = {t: {} for t in topics.all()} | dict(configured or {})
        missing = [t for t in wanted if t not in existing]
        if missing:
            try:
                admin.create_topics({t: {"num_partitions": partitions, "replication_factor": replication,
                                         "configs": dict(wanted[t])} for t in missing}, wait_for_metadata=True)
            except TopicAlreadyExistsError:
                pass  # another process created them first
            log.info("kafka: created topics %s (%d partitions)", ", ".join(missing), partitions)
    finally:
        admin.close()


def reliable_producer(bootstrap: str, client_id: str, **overrides: object) -> KafkaProducer:
    """Idempotent, acks=all: a send is acknowledged only once every in-sync replica has it; and in
    order per partition (the rules depend on a machine's order): one request in flight, because
    kafka-python puts a batch to retry back at the head of its partition's queue, so two failed
    batches (``NotLeaderForPartition`` while a new topic elects its leader) would go out swapped."""
    settings: dict[str, object] = {"bootstrap_servers": bootstrap, "client_id": client_id, "acks": "all",
                                   "enable_idempotence": True, "linger_ms": 5, "batch_size": 65536,
                                   "max_in_flight_requests_per_connection": 1}
    return KafkaProducer(**(settings | overrides))


def close_producer(producer: KafkaProducer, timeout_s: float) -> bool:
    """Close ``producer`` once its records in flight are confirmed, or after ``timeout_s``: the ones
    still unconfirmed then are abandoned (their futures fail) instead of a ``KafkaTimeoutError``
    escaping and leaving its I/O thread behind. True when nothing was abandoned."""
    try:
        producer.close(timeout=timeout_s)
        return True
    except KafkaTimeoutError:
        sender = producer._sender  # kafka-python has no public abort: its I/O thread fails what is left
        sender.force_close()
        sender.join(timeout_s + 5.0)
        producer.close(timeout=0)
        return False

