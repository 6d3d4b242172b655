"""Kafka (KRaft, one node) through the harness, with kafka-python: topics, keyed idempotent
produce with acks=all, and consumption by a fresh consumer group."""

from __future__ import annotations

import time
from collections import defaultdict

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

pytestmark = pytest.mark.integration

MACHINES = [f"m{i:02d}" for i in range(1, 9)]
PER_MACHINE = 25


@pytest.fixture
def admin(kafka, unique_name):
    client = KafkaAdminClient(bootstrap_servers=kafka.bootstrap, client_id=f"{unique_name}-admin")
    yield client
    client.close()


def test_harness_broker_is_ready(kafka, admin):
    assert kafka.bootstrap == f"127.0.0.1:{kafka.port}"
    brokers = admin.describe_cluster()["brokers"]
    assert [(b["broker_id"], b["host"], b["port"]) for b in brokers] == [(1, "127.0.0.1", kafka.port)]


def test_keyed_messages_keep_per_key_order(kafka, admin, unique_name):
    topic = f"{unique_name}.results"
    admin.create_topics({topic: {"num_partitions": 4, "replication_factor": 1}}, wait_for_metadata=True)
    (described,) = admin.describe_topics([topic])
    assert len(described["partitions"]) == 4

    producer = KafkaProducer(
        bootstrap_servers=kafka.bootstrap,
        client_id=f"{unique_name}-producer",
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
    )
    sent_partition: dict[str, set[int]] = defaultdict(set)
    try:
        futures = []
        for seq in range(PER_MACHINE):  # interleave machines, as a bridge would
            for machine in MACHINES:
                futures.append((machine, producer.send(topic, key=machine.encode(), value=f"{machine}:{seq}".encode())))
        for machine, future in futures:
            metadata = future.get(timeout=30)
            sent_partition[machine].add(metadata.partition)
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=10)

    # One partition per key; with 8 keys over 4 partitions more than one partition is used.
    assert all(len(parts) == 1 for parts in sent_partition.values())
    assert len({p for parts in sent_partition.values() for p in parts}) > 1

    group = f"{unique_name}.group"
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka.bootstrap,
        group_id=group,
        client_id=f"{unique_name}-consumer",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    received = []
    try:
        deadline = time.monotonic() + 60
        while len(received) < len(MACHINES) * PER_MACHINE and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                received.extend(records)
        consumer.commit()
    finally:
        consumer.close()

    assert len(received) == len(MACHINES) * PER_MACHINE
    by_key: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for record in received:
        machine, seq = record.value.decode().split(":")
        assert machine == record.key.decode()
        by_key[machine].append((record.partition, record.offset, int(seq)))
    for machine, rows in by_key.items():
        assert {p for p, _, _ in rows} == sent_partition[machine]
        rows.sort(key=lambda r: r[1])  # offset order within the partition
        assert [seq for _, _, seq in rows] == list(range(PER_MACHINE)), machine

    # The fresh group committed where it stopped: the end of every partition it read.
    committed = admin.list_group_offsets({group: None})[group]
    assert {tp.topic for tp in committed} == {topic}
    assert sum(meta.offset for meta in committed.values()) == len(MACHINES) * PER_MACHINE
