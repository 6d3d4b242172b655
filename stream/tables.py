"""The worker's tables: each key's value in memory, per partition, and every write a record on the
table's compacted changelog topic in Kafka, in the partition of the input it came from; a worker
given a partition rebuilds its part of the tables from those changelogs (:class:`Restorer`).

A changelog topic is ``<group>-<table>-changelog``, keyed by the table's key (UTF-8), its value the
JSON of the table's value (stdlib ``json``: a rule state may hold an infinite level, which orjson
would write as null), a tombstone for a deleted key. Segments roll every ``CHANGELOG_SEGMENT_MS``
so that compaction keeps a changelog near one record per live key, and a restore short."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from stream.batches import Record

log = logging.getLogger(__name__)

CHANGELOG_SEGMENT_MS = 10 * 60 * 1000
CHANGELOG_CONFIG = {"cleanup.policy": "compact", "segment.ms": str(CHANGELOG_SEGMENT_MS),
                    "min.cleanable.dirty.ratio": "0.1"}
"""Topic settings of every changelog: compacted, in segments short enough to be compacted soon."""


def changelog_topic(group: str, table: str) -> str:
    return f"{group}-{table}-changelog"


class ChangelogTable:
    """One table of the worker (:class:`stream.batches.BatchTable`): ``put`` and ``drop`` change the
    value in memory at once and hand back the acknowledgement of their changelog record.

    ``ends`` holds, per partition, the changelog's end offset as this worker last knew it (after
    its own acknowledged writes, or its restore): equal to Kafka's at a new assignment, nobody
    else wrote the partition meanwhile, and the memory is kept instead of restored."""

    def __init__(self, name: str, topic: str, producer: AIOKafkaProducer) -> None:
        self.name = name
        self.topic = topic
        self._producer = producer
        self._data: dict[int, dict[str, Any]] = {}
        self.ends: dict[int, int] = {}

    def get(self, key: str, record: Record) -> Any:
        return self._data.get(record.partition, {}).get(key)

    def put(self, key: str, value: Any, record: Record) -> Any:
        self._data.setdefault(record.partition, {})[key] = value
        return self._send(record.partition, key, json.dumps(value, separators=(",", ":")).encode())

    def drop(self, key: str, record: Record) -> Any:
        self._data.get(record.partition, {}).pop(key, None)
        return self._send(record.partition, key, None)

    def items(self) -> Iterator[tuple[str, Any]]:
        """Every key and value of the partitions held."""
        for values in list(self._data.values()):
            yield from list(values.items())

    def held(self) -> set[int]:
        return set(self._data)

    def forget(self, partitions: Iterable[int]) -> None:
        for partition in partitions:
            self._data.pop(partition, None)
            self.ends.pop(partition, None)

    def load(self, partition: int, records: Iterable[tuple[bytes, bytes | None]], end: int) -> int:
        """Replace a partition's values by what its changelog records say, up to offset ``end``."""
        values: dict[str, Any] = {}
        applied = 0
        for key, value in records:
            applied += 1
            if value is None:
                values.pop(key.decode(), None)
            else:
                values[key.decode()] = json.loads(value)
        self._data[partition] = values
        self.ends[partition] = end
        return applied

    async def _send(self, partition: int, key: str, value: bytes | None) -> Any:
        ack = await self._producer.send(self.topic, value=value, key=key.encode(), partition=partition)
        metadata = await ack
        self.ends[partition] = max(self.ends.get(partition, 0), metadata.offset + 1)
        return metadata


class Restorer:
    """Reads changelog partitions from their start to their end offset (no consumer group)."""

    def __init__(self, bootstrap: str, client_id: str) -> None:
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, client_id=client_id, group_id=None,
                                          enable_auto_commit=False, auto_offset_reset="earliest")

    async def start(self) -> None:
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()

    async def take_over(self, tables: Sequence[ChangelogTable], partitions: set[int]) -> int:
        """Hold exactly ``partitions`` of every table: drop the others, and restore each one whose
        changelog others wrote since this worker last held it; the records read."""
        for table in tables:
            table.forget(table.held() - partitions)
        tps = [TopicPartition(table.topic, p) for table in tables for p in sorted(partitions)]
        if not tps:
            return 0
        ends = await self._consumer.end_offsets(tps)
        stale = [tp for tp in tps if _table(tables, tp).ends.get(tp.partition) != ends[tp]
                 or tp.partition not in _table(tables, tp).held()]
        if not stale:
            return 0
        started = time.monotonic()
        read = await self._read(stale, ends)
        applied = 0
        for tp in stale:
            applied += _table(tables, tp).load(tp.partition, read[tp], ends[tp])
        log.info("worker: restored %d changelog records of %d partitions in %.2f s", applied, len(stale),
                 time.monotonic() - started)
        return applied

    async def _read(self, tps: list[TopicPartition], ends: dict[TopicPartition, int]
                    ) -> dict[TopicPartition, list[tuple[bytes, bytes | None]]]:
        consumer = self._consumer
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        read: dict[TopicPartition, list[tuple[bytes, bytes | None]]] = {tp: [] for tp in tps}
        remaining = {tp for tp in tps if ends[tp] > 0}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=500, max_records=10_000)
            for tp, records in batch.items():
                read[tp] += [(r.key, r.value) for r in records if r.offset < ends[tp]]
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
        consumer.assign([])
        return read


def _table(tables: Sequence[ChangelogTable], tp: TopicPartition) -> ChangelogTable:
    return next(table for table in tables if table.topic == tp.topic)
