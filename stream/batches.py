"""A batch of Kafka records in the worker (:mod:`stream.worker`): rule states and dedupe marks read once and
written once per batch, each tagged with the input it covers, so that a replay after a crash
neither loses nor doubles anything.

Why tagging: a worker that dies mid-batch (``kill -9``) may have flushed some of its table writes
and not others, and its input offsets were not committed, so the next owner replays the batch.

* A rule state is stored with the position (topic, partition, offset) of the newest record it has
  taken. On replay, the engine is told (:meth:`StateCache.fresh`) to leave a state alone for the
  records it already holds, so no state takes an input twice, and every state takes each input once.
* A dedupe mark stores where its ``msg_id`` was first read. The same record read again (a replay)
  is not a duplicate; another record with that ``msg_id`` (an upstream redelivery) is.
* The batch's outputs are acknowledged by Kafka before any of its states or marks is written, so
  a state never covers an input whose outputs could still be lost.
* The worker commits input offsets itself (:class:`Offsets`), only for records whose outputs,
  states and marks Kafka has acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, MutableMapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from stream.rules import Observation, RuleState

log = logging.getLogger(__name__)

DEDUPE_BUCKETS = 60
"""Marks are kept per scope (a machine, or a line) in buckets of ``dedupe_ttl_s / DEDUPE_BUCKETS``
of event time; a record's copies carry its ``ts``, so one bucket answers whether it was seen. A
batch rewrites each bucket it added to, whole: narrow buckets (1 s at the default 60 s) keep that
write near the batch's own ids (with 6, a 50-machine site at 100 ms batches wrote 2.6 MB/s of marks,
with 60 0.3 MB/s)."""


class Record(Protocol):
    """A Kafka record as the worker reads it (aiokafka's ``ConsumerRecord``)."""

    @property
    def topic(self) -> str: ...

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...

    @property
    def key(self) -> bytes | None: ...

    @property
    def value(self) -> bytes | None: ...


class TP(NamedTuple):
    """A topic partition (aiokafka's ``TopicPartition`` is one as well)."""

    topic: str
    partition: int


class Position(NamedTuple):
    """Where a record was read: topic, partition, offset (a tuple: the worker makes one per record,
    and a frozen dataclass's ``__init__`` costs several times a tuple's)."""

    topic: str
    partition: int
    offset: int

    @classmethod
    def of(cls, record: Record) -> Position:
        return cls(record.topic, record.partition, record.offset)

    @property
    def source(self) -> str:
        return f"{self.topic}/{self.partition}"

    def __str__(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"


Pending = list[Awaitable[Any]]
"""The acknowledgements a batch waits for before its input counts as done."""


class BatchTable(Protocol):
    """A table as a batch reads and writes it: each access belongs to the partition of a record,
    and a write hands back its changelog record's acknowledgement (None: written for good)."""

    def get(self, key: str, record: Record) -> Any: ...

    def put(self, key: str, value: Any, record: Record) -> Awaitable[Any] | None: ...

    def drop(self, key: str, record: Record) -> Awaitable[Any] | None: ...


@dataclass
class _Entry:
    state: RuleState | None
    held: Position | None
    """The newest record the stored state took (as read when the batch began)."""
    record: Record | None = None
    newest: Position | None = None
    """The newest record it took in this batch."""
    dirty: bool = False


class StateCache(MutableMapping[str, RuleState]):
    """The rule states the batches of a :class:`Checkpoint` touch, read from ``table`` once and
    written back by :meth:`flush` once, each with the position of the newest record it took.

    The engine reads and writes it as its ``states``; :meth:`fresh` is the engine's ``fresh``
    hook. ``origin(obs)`` says which record (record and position) an observation came from."""

    def __init__(self, table: BatchTable, origin: Callable[[Observation], tuple[Record, Position]]) -> None:
        self._table = table
        self._origin = origin
        self._entries: dict[str, _Entry] = {}

    def fresh(self, key: str, obs: Observation) -> bool:
        """False when the stored state of ``key`` already took the record ``obs`` came from (all
        of that record's observations, which were taken in the batch that stored it)."""
        record, position = self._origin(obs)
        entry = self._load(key, record)
        held = entry.held
        if (held is not None and position.offset <= held.offset and held.partition == position.partition
                and held.topic == position.topic):
            return False
        entry.record, entry.newest = record, position
        return True

    def flush(self, pending: Pending) -> int:
        """Write every state the batch changed, with its newest record; how many were written.
        Their changelog acknowledgements are added to ``pending``."""
        written = 0
        for key, entry in self._entries.items():
            if entry.dirty and entry.state is not None and entry.record is not None and entry.newest is not None:
                _wait_for(pending, self._table.put(key, {"state": entry.state.to_dict(), "source": entry.newest.source,
                                                         "upto": entry.newest.offset}, entry.record))
                written += 1
        self.discard()
        return written

    def discard(self) -> None:
        """Forget every state read or changed since the last :meth:`flush`."""
        self._entries.clear()

    def _load(self, key: str, record: Record) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            stored = self._table.get(key, record)
            if stored is None:
                entry = _Entry(None, None, record)
            elif "state" in stored:
                topic, _, partition = stored["source"].rpartition("/")
                entry = _Entry(RuleState.from_dict(stored["state"]), Position(topic, int(partition), stored["upto"]),
                               record)
            else:  # written before states carried their position (no replay guard for it yet)
                entry = _Entry(RuleState.from_dict(stored), None, record)
            self._entries[key] = entry
        return entry

    def __getitem__(self, key: str) -> RuleState:
        entry = self._entries.get(key)
        if entry is None or entry.state is None:
            raise KeyError(key)
        return entry.state

    def __setitem__(self, key: str, state: RuleState) -> None:
        entry = self._entries[key]  # fresh() loaded it before the engine could change it
        entry.state, entry.dirty = state, True

    def __delitem__(self, key: str) -> None:
        raise NotImplementedError("the engine never deletes a rule state")

    def __iter__(self) -> Iterator[str]:
        return iter(key for key, entry in self._entries.items() if entry.state is not None)

    def __len__(self) -> int:
        return sum(1 for entry in self._entries.values() if entry.state is not None)


class Marks:
    """``msg_id`` dedupe marks of a batch, per scope (a machine or a line) and event-time bucket,
    read once per bucket and written once per bucket by :meth:`flush`; buckets older than
    ``ttl_s`` behind a scope's newest are deleted."""

    def __init__(self, table: BatchTable, ttl_s: float) -> None:
        self._table = table
        self._width = ttl_s / DEDUPE_BUCKETS
        self._buckets: dict[str, dict[str, str]] = {}
        self._indexes: dict[str, list[int]] = {}
        self._records: dict[str, Record] = {}
        self._dirty: set[str] = set()

    def first(self, scope: str, msg_id: str, ts: float, record: Record, position: Position) -> bool:
        """True for the first record with ``msg_id`` (or that same record read again); False
        for another record carrying it: an upstream duplicate."""
        bucket = math.floor(ts / self._width) if math.isfinite(ts) else 0
        index = self._index(scope, record)
        if index and bucket < index[-1] - DEDUPE_BUCKETS:
            return True  # older than the dedupe horizon: its observations are late for every rule anyway
        key = f"{scope}|{bucket}"
        marks = self._bucket(key, record)
        seen = marks.get(msg_id)
        if seen is None:
            marks[msg_id] = str(position)
            self._dirty.add(key)
            if bucket not in index:
                index.append(bucket)
                index.sort()
                self._dirty.add(f"{scope}|index")
            self._records[scope] = record
            return True
        return seen == str(position)

    def flush(self, pending: Pending) -> None:
        """Write the changed buckets and indexes; delete the buckets past the horizon. Their
        changelog acknowledgements are added to ``pending``."""
        for scope, index in self._indexes.items():
            record = self._records.get(scope)
            if record is None or f"{scope}|index" not in self._dirty and not any(
                    f"{scope}|{b}" in self._dirty for b in index):
                continue
            expired = [b for b in index if b < index[-1] - DEDUPE_BUCKETS]
            kept = [b for b in index if b not in expired]
            for bucket in kept:
                if f"{scope}|{bucket}" in self._dirty:
                    _wait_for(pending, self._table.put(f"{scope}|{bucket}", self._buckets[f"{scope}|{bucket}"], record))
            for bucket in expired:
                _wait_for(pending, self._table.drop(f"{scope}|{bucket}", record))
            if expired or f"{scope}|index" in self._dirty:
                _wait_for(pending, self._table.put(f"{scope}|index", kept, record))
        self.discard()

    def discard(self) -> None:
        """Forget every bucket read or changed since the last :meth:`flush`."""
        self._buckets.clear()
        self._indexes.clear()
        self._records.clear()
        self._dirty.clear()

    def _index(self, scope: str, record: Record) -> list[int]:
        index = self._indexes.get(scope)
        if index is None:
            index = list(self._table.get(f"{scope}|index", record) or [])
            self._indexes[scope] = index
        return index

    def _bucket(self, key: str, record: Record) -> dict[str, str]:
        marks = self._buckets.get(key)
        if marks is None:
            marks = dict(self._table.get(key, record) or {})
            self._buckets[key] = marks
        return marks


class Checkpoint:
    """A rules stage's states and dedupe marks across its batches until the next :meth:`flush`
    (write-behind; the worker flushes on its commit timer): each state and mark bucket they touch
    is written once per checkpoint, not once per batch, and their records count as finished (their
    offsets may be committed) only once those writes are acknowledged.

    Why: at a 50-machine site a 100 ms batch touches about as many states and buckets as it has
    records, so writing them per batch produced more changelog records than the input had.

    Kept: a batch runs and waits for its outputs inside :meth:`batch`, which holds ``lock``, as
    :meth:`flush` does, so no state is written that covers an input whose outputs are not
    acknowledged. A batch that fails or is cancelled mid-way discards what the checkpoint holds;
    its records and the unwritten ones before it are read again by whoever owns their partitions
    next, and the stored states skip what they already hold (:meth:`StateCache.fresh`), so the
    replay re-emits the same ids."""

    def __init__(self, states: BatchTable, marks: BatchTable, dedupe_ttl_s: float) -> None:
        self.lock = asyncio.Lock()
        self._flushing = asyncio.Lock()
        self.origins: dict[int, tuple[Record, Position]] = {}
        """The current batch's observations (by ``id``) to the record each came from."""
        self.states = StateCache(states, lambda obs: self.origins[id(obs)])
        self.marks = Marks(marks, dedupe_ttl_s)
        self._taken: list[Record] = []

    @asynccontextmanager
    async def batch(self, records: Sequence[Record]) -> AsyncIterator[Marks]:
        """Process ``records`` inside (outputs acknowledged before it ends), with the marks to dedupe on."""
        async with self.lock:
            try:
                yield self.marks
            except BaseException:
                self._discard()
                raise
            self._taken.extend(records)

    async def flush(self) -> list[Record]:
        """Write what the batches since the last flush changed and wait for Kafka's acks; the
        records now finished. The writes are taken under ``lock`` and their acks awaited outside
        it, so batches go on meanwhile; one flush at a time, so a key's writes reach Kafka in
        order. A failed write raises: the worker must then stop and commit nothing more (a later
        flush would cover these records' offsets without their states)."""
        async with self._flushing:
            async with self.lock:
                if not self._taken:
                    return []
                pending: Pending = []
                self.states.flush(pending)
                self.marks.flush(pending)
                finished, self._taken = self._taken, []
                writes = [asyncio.ensure_future(ack) for ack in pending]
            await asyncio.gather(*writes)
            return finished

    def _discard(self) -> None:
        """Forget what the batches since the last flush changed and took."""
        self.states.discard()
        self.marks.discard()
        self.origins = {}
        self._taken = []


def _wait_for(pending: Pending, ack: Awaitable[Any] | None) -> None:
    if ack is not None:
        pending.append(ack)


class Offsets:
    """Where each assigned input partition stands in the worker: the next record a batch may take
    (from the group's committed offset, or the start of the partition, when it was assigned) and
    the records finished, whose offsets the worker commits.

    Why the check: a batch fetched just before a rebalance can reach the worker after it, and the
    partitions of the new assignment are read again from their committed offsets; such records
    are taken once, in order, and a partition whose next record did not come first is read again
    from it (:meth:`take`'s rewinds)."""

    def __init__(self) -> None:
        self._next: dict[TP, int] = {}
        self._done: dict[TP, int] = {}

    def assign(self, positions: dict[TP, int]) -> None:
        """A new assignment, each partition read from its offset in ``positions``; what was
        finished and not committed is dropped (the revoke committed it, or it is read again)."""
        self._next = dict(positions)
        self._done = {}

    def revoke(self) -> None:
        self._next = {}

    def take(self, batch: Iterable[tuple[TP, Sequence[Record]]]) -> tuple[list[Record], dict[TP, int]]:
        """The records of ``batch`` (per partition, in order) a batch may process now, and the
        partitions to read again from an offset (a record before it never came)."""
        taken: list[Record] = []
        rewinds: dict[TP, int] = {}
        for tp, records in batch:
            expected = self._next.get(tp)
            if expected is None:
                continue  # not assigned any more
            for record in records:
                if record.offset < expected:
                    continue  # read before (the batch straddled a rebalance)
                if record.offset > expected:
                    log.warning("worker: %s/%d jumped from offset %d to %d: reading it again from %d",
                                tp.topic, tp.partition, expected, record.offset, expected)
                    rewinds[tp] = expected
                    break
                taken.append(record)
                expected += 1
            self._next[tp] = expected
        return taken, rewinds

    def finished(self, records: Iterable[Record]) -> None:
        """Records whose outputs, states and marks Kafka has acknowledged."""
        for record in records:
            tp = TP(record.topic, record.partition)
            if tp in self._next:
                self._done[tp] = max(self._done.get(tp, 0), record.offset + 1)

    def to_commit(self) -> dict[TP, int]:
        """The offsets to commit (each partition's next record to read); forgotten once handed out."""
        done, self._done = self._done, {}
        return done
