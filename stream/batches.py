"""A batch of Kafka records in the Faust worker: rule states and dedupe marks read once and
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
* The worker commits input offsets itself (:class:`Progress`), only for records whose outputs,
  states and marks Kafka has acknowledged.

Faust tables know the partition of a key from the stream's current event; a batch mixes
partitions, so every read and write runs under the event its key came from (:func:`at_event`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from faust.streams import _current_event  # the context variable faust.current_event() reads
from faust.types import TP, CollectionT, EventT

from stream.rules import Observation, RuleState

log = logging.getLogger(__name__)

DEDUPE_BUCKETS = 60
"""Marks are kept per scope (a machine, or a line) in buckets of ``dedupe_ttl_s / DEDUPE_BUCKETS``
of event time; a record's copies carry its ``ts``, so one bucket answers whether it was seen. A
batch rewrites each bucket it added to, whole: narrow buckets (1 s at the default 60 s) keep that
write near the batch's own ids (with 6, a 50-machine site at 100 ms batches wrote 2.6 MB/s of marks,
with 60 0.3 MB/s)."""


@dataclass(frozen=True, slots=True)
class Position:
    """Where a record was read: topic, partition, offset."""

    topic: str
    partition: int
    offset: int

    @classmethod
    def of(cls, event: EventT) -> Position:
        message = event.message
        return cls(message.topic, message.partition, message.offset)

    @property
    def source(self) -> str:
        return f"{self.topic}/{self.partition}"

    def __str__(self) -> str:
        return f"{self.source}/{self.offset}"


@contextmanager
def at_event(event: EventT) -> Iterator[None]:
    """Table reads and writes inside go to ``event``'s partition (and its changelog partition)."""
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


Pending = list[Awaitable[Any]]
"""The acknowledgements a batch waits for before its input counts as done."""


class BatchTable(Protocol):
    """A table as a batch reads and writes it: each access belongs to the partition of an event,
    and a write hands back its changelog record's acknowledgement (None: written for good)."""

    def get(self, key: str, event: EventT) -> Any: ...

    def put(self, key: str, value: Any, event: EventT) -> Awaitable[Any] | None: ...

    def drop(self, key: str, event: EventT) -> Awaitable[Any] | None: ...


class FaustTable:
    """A Faust table written so that a batch can wait for its changelog records: ``table[key] =
    value`` queues the record and forgets it, and a batch must not count its input done (commit
    its offsets) before its states are in Kafka.

    A write's record goes straight to the producer, not through Faust's producer buffer (its
    ``send_changelog``): that buffer sends one record per event-loop turn, and once it holds 100 the
    stream waits for it record by record. In the 50-machine bench the worker then sat at 39 % of a
    core, 'producer buffer full' in its log, and fell 700 msg/s behind."""

    def __init__(self, table: CollectionT) -> None:
        self._table = table

    def get(self, key: str, event: EventT) -> Any:
        with at_event(event):
            return self._table.get(key)

    def put(self, key: str, value: Any, event: EventT) -> Awaitable[Any]:
        with at_event(event):
            self._table.data[key] = value
        return self._send(event.message.partition, key, value, self._table.value_serializer)

    def drop(self, key: str, event: EventT) -> Awaitable[Any]:
        with at_event(event):
            self._table.data.pop(key, None)
        return self._send(event.message.partition, key, None, "raw")

    async def _send(self, partition: int, key: str, value: Any, value_serializer: Any) -> Any:
        """Produce a changelog record and wait for Kafka's ack (the table's callback keeps the
        offset a persistent store recovers from, as Faust's own write does)."""
        table = self._table
        ack = await table.changelog_topic.send(key=key, value=value, partition=partition,
                                               key_serializer=table.key_serializer,
                                               value_serializer=value_serializer,
                                               callback=table._on_changelog_sent)
        return await ack


@dataclass
class _Entry:
    state: RuleState | None
    held: Position | None
    """The newest record the stored state took (as read when the batch began)."""
    event: EventT | None = None
    newest: Position | None = None
    """The newest record it took in this batch."""
    dirty: bool = False


class StateCache(MutableMapping[str, RuleState]):
    """The rule states the batches of a :class:`Checkpoint` touch, read from ``table`` once and
    written back by :meth:`flush` once, each with the position of the newest record it took.

    The engine reads and writes it as its ``states``; :meth:`fresh` is the engine's ``fresh``
    hook. ``origin(obs)`` says which record (event and position) an observation came from."""

    def __init__(self, table: BatchTable, origin: Callable[[Observation], tuple[EventT, Position]]) -> None:
        self._table = table
        self._origin = origin
        self._entries: dict[str, _Entry] = {}

    def fresh(self, key: str, obs: Observation) -> bool:
        """False when the stored state of ``key`` already took the record ``obs`` came from (all
        of that record's observations, which were taken in the batch that stored it)."""
        event, position = self._origin(obs)
        entry = self._load(key, event)
        held = entry.held
        if held is not None and held.source == position.source and position.offset <= held.offset:
            return False
        entry.event, entry.newest = event, position
        return True

    def flush(self, pending: Pending) -> int:
        """Write every state the batch changed, with its newest record; how many were written.
        Their changelog acknowledgements are added to ``pending``."""
        written = 0
        for key, entry in self._entries.items():
            if entry.dirty and entry.state is not None and entry.event is not None and entry.newest is not None:
                _wait_for(pending, self._table.put(key, {"state": entry.state.to_dict(), "source": entry.newest.source,
                                                         "upto": entry.newest.offset}, entry.event))
                written += 1
        self.discard()
        return written

    def discard(self) -> None:
        """Forget every state read or changed since the last :meth:`flush`."""
        self._entries.clear()

    def _load(self, key: str, event: EventT) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            stored = self._table.get(key, event)
            if stored is None:
                entry = _Entry(None, None, event)
            elif "state" in stored:
                topic, _, partition = stored["source"].rpartition("/")
                entry = _Entry(RuleState.from_dict(stored["state"]), Position(topic, int(partition), stored["upto"]),
                               event)
            else:  # written before states carried their position (no replay guard for it yet)
                entry = _Entry(RuleState.from_dict(stored), None, event)
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
        self._events: dict[str, EventT] = {}
        self._dirty: set[str] = set()

    def first(self, scope: str, msg_id: str, ts: float, event: EventT, position: Position) -> bool:
        """True for the first record with ``msg_id`` (or that same record read again); False
        for another record carrying it: an upstream duplicate."""
        bucket = math.floor(ts / self._width) if math.isfinite(ts) else 0
        index = self._index(scope, event)
        if index and bucket < index[-1] - DEDUPE_BUCKETS:
            return True  # older than the dedupe horizon: its observations are late for every rule anyway
        key = f"{scope}|{bucket}"
        marks = self._bucket(key, event)
        seen = marks.get(msg_id)
        if seen is None:
            marks[msg_id] = str(position)
            self._dirty.add(key)
            if bucket not in index:
                index.append(bucket)
                index.sort()
                self._dirty.add(f"{scope}|index")
            self._events[scope] = event
            return True
        return seen == str(position)

    def flush(self, pending: Pending) -> None:
        """Write the changed buckets and indexes; delete the buckets past the horizon. Their
        changelog acknowledgements are added to ``pending``."""
        for scope, index in self._indexes.items():
            event = self._events.get(scope)
            if event is None or f"{scope}|index" not in self._dirty and not any(
                    f"{scope}|{b}" in self._dirty for b in index):
                continue
            expired = [b for b in index if b < index[-1] - DEDUPE_BUCKETS]
            kept = [b for b in index if b not in expired]
            for bucket in kept:
                if f"{scope}|{bucket}" in self._dirty:
                    _wait_for(pending, self._table.put(f"{scope}|{bucket}", self._buckets[f"{scope}|{bucket}"], event))
            for bucket in expired:
                _wait_for(pending, self._table.drop(f"{scope}|{bucket}", event))
            if expired or f"{scope}|index" in self._dirty:
                _wait_for(pending, self._table.put(f"{scope}|index", kept, event))
        self.discard()

    def discard(self) -> None:
        """Forget every bucket read or changed since the last :meth:`flush`."""
        self._buckets.clear()
        self._indexes.clear()
        self._events.clear()
        self._dirty.clear()

    def _index(self, scope: str, event: EventT) -> list[int]:
        index = self._indexes.get(scope)
        if index is None:
            index = list(self._table.get(f"{scope}|index", event) or [])
            self._indexes[scope] = index
        return index

    def _bucket(self, key: str, event: EventT) -> dict[str, str]:
        marks = self._buckets.get(key)
        if marks is None:
            marks = dict(self._table.get(key, event) or {})
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
        self.origins: dict[int, tuple[EventT, Position]] = {}
        """The current batch's observations (by ``id``) to the record each came from."""
        self.states = StateCache(states, lambda obs: self.origins[id(obs)])
        self.marks = Marks(marks, dedupe_ttl_s)
        self._taken: list[EventT] = []

    @asynccontextmanager
    async def batch(self, events: Sequence[EventT]) -> AsyncIterator[Marks]:
        """Process ``events`` inside (outputs acknowledged before it ends), with the marks to dedupe on."""
        async with self.lock:
            try:
                yield self.marks
            except BaseException:
                self._discard()
                raise
            self._taken.extend(events)

    async def flush(self) -> list[EventT]:
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


REWIND_RETRY_S = 1.0
"""How long a partition read again from a skipped record waits for it before seeking again."""
STALL_S = 5.0
"""How long a partition whose next record is in Kafka may go without one taken before it is read
again from that record."""


class Progress:
    """The input records a worker has finished, per partition: the offsets it commits itself.

    Faust's own acks cannot be trusted with a batch: during a rebalance it skips the records it
    reads and acks them as if processed, and its commit right after a rebalance may pass records
    not yet processed (found by the test whose group grows and shrinks, under load: one result of a
    machine lost, its states one step off). So the batched topics run with Faust's acks off. A
    batch takes only the records of the current consumer generation, each partition's in order
    from where the last batch of this generation stopped; what it finished (its outputs, states
    and marks acknowledged by Kafka) is committed by the worker, on a timer and before a rebalance
    or a stop lets the partitions go. A record read but not taken is read again: by this worker
    after the rebalance (Faust seeks every partition to its committed offset), or by the next owner.

    Faust can also drop records inside a generation: its fetcher marks a record read when a pause
    of the flow cuts its delivery short, and its fetch loop, which sets its read offset after the
    records it was delivering, can undo a seek (the one to the committed offset that starts a
    generation included). The first record of a partition then comes after the offset the
    generation started from (``start_of``), or a later one jumps over an offset. The partition is
    read again from the skipped record (:meth:`rewinds`, the worker seeks), its records are not
    taken until that one comes, and the seek is repeated every ``REWIND_RETRY_S`` until it does.
    A skip shows only when a later record comes: a partition whose last records were skipped, or
    whose fetch stopped, is found by :meth:`stalled` (Kafka holds its next record, none came for
    ``STALL_S``) and read again the same way."""

    def __init__(self, start_of: Callable[[TP], int | None]) -> None:
        self._start_of = start_of
        self._next: dict[TP, int] = {}
        self._done: dict[TP, int] = {}
        self._rewinding: set[TP] = set()
        """Partitions waiting for the record at their ``_next`` offset, which they skipped."""
        self._sought_at: dict[TP, float] = {}
        self._waiting_since: dict[TP, float] = {}
        """Partitions whose next record Kafka holds, since when none was taken."""
        self._generation: int | None = None
        self._closed: int | None = None
        self.gaps = 0

    def take(self, events: Sequence[EventT], generation: int) -> list[EventT]:
        """The records of ``events`` a batch may process now."""
        self._enter(generation)
        if generation == self._closed:
            return []  # the partitions are being let go: the next owner reads these
        taken: list[EventT] = []
        for event in events:
            message = event.message
            if message.generation_id != generation:
                continue
            expected = self._expected(message.tp)
            if expected is not None and message.offset != expected:
                if message.offset > expected and message.tp not in self._rewinding:
                    self.gaps += 1
                    log.warning("worker: %s jumped from offset %d to %d: reading it again from %d",
                                message.tp, expected, message.offset, expected)
                    self._next[message.tp] = expected
                    self._rewinding.add(message.tp)
                continue  # read before (offset < expected), or after a record still to come
            self._rewinding.discard(message.tp)
            self._sought_at.pop(message.tp, None)
            self._waiting_since.pop(message.tp, None)
            self._next[message.tp] = message.offset + 1
            taken.append(event)
        return taken

    def stalled(self, ends: Mapping[TP, int], generation: int, now: float) -> None:
        """Given each assigned partition's end offset in Kafka: a partition that holds its next
        record (the one after the last taken, or the committed one) and has had none taken for
        ``STALL_S`` (``now``: a monotonic clock) is read again from that record, as after a skip
        (:meth:`rewinds`). Seen under load after a restart: the last records of a partition never
        taken, and no later record to show a jump."""
        self._enter(generation)
        if generation == self._closed:
            return
        for tp, end in ends.items():
            expected = self._expected(tp)
            if tp in self._rewinding or expected is None or end <= expected:
                self._waiting_since.pop(tp, None)
                continue
            if now - self._waiting_since.setdefault(tp, now) >= STALL_S:
                self.gaps += 1
                log.warning("worker: no record of %s taken for %g s while Kafka holds offsets %d to %d: reading it "
                            "again from %d", tp, STALL_S, expected, end - 1, expected)
                self._next[tp] = expected
                self._rewinding.add(tp)
                self._waiting_since.pop(tp, None)

    def _expected(self, tp: TP) -> int | None:
        """The offset of the partition's next record to take: after the last one taken in this
        generation, or where the generation started (None: not known yet)."""
        expected = self._next.get(tp)
        return self._start_of(tp) if expected is None else expected

    def _enter(self, generation: int) -> None:
        """Forget the positions of an earlier generation (its partitions were revoked or reassigned)."""
        if generation != self._generation:
            self._next.clear()
            self._rewinding.clear()
            self._sought_at.clear()
            self._waiting_since.clear()
            self._generation = generation

    def rewinds(self, now: float) -> dict[TP, int]:
        """Partitions that skipped a record and the offset to read them again from: each when it
        is found, and again every ``REWIND_RETRY_S`` (``now``: a monotonic clock) until it comes."""
        due = {tp: self._next[tp] for tp in self._rewinding
               if now - self._sought_at.get(tp, -math.inf) >= REWIND_RETRY_S}
        for tp in due:
            self._sought_at[tp] = now
        return due

    def rewound(self, tp: TP, offset: int) -> None:
        """``tp`` is read again from ``offset`` (later than the skipped record when retention
        already deleted it)."""
        self._next[tp] = offset
        self._rewinding.add(tp)

    def finished(self, events: Sequence[EventT]) -> None:
        """A batch's records are done: their outputs, states and marks are in Kafka."""
        for event in events:
            message = event.message
            self._done[message.tp] = max(self._done.get(message.tp, 0), message.offset + 1)

    def close(self, generation: int) -> None:
        """No batch takes a record of ``generation`` any more (its partitions are being revoked)."""
        self._closed = generation

    def to_commit(self) -> dict[TP, int]:
        """The offsets to commit (each partition's next record to read); forgotten once handed out."""
        done, self._done = self._done, {}
        return done
