"""The central stream processor: workers in one Kafka consumer group around the pure rules engine.

One engine, two runners: this worker drives the same :class:`stream.rules.RulesEngine` as the
embedded runner, with its state in changelogged tables (:mod:`stream.tables`) instead of memory,
so a restarted or rebalanced worker resumes where the last owner of a partition stopped.

A worker is one aiokafka consumer (group ``<prefix>-worker-<site>``, the range assignor, so that
partition p of every input topic and of every changelog has one owner) and one idempotent
producer. Each batch of records it fetches goes through three stages, side by side:

* machine stage, on ``edgeline.results`` + ``edgeline.anomalies`` (keyed by machine): parse (bad
  input to ``edgeline.deadletter``, counted), dedupe on ``msg_id`` (marks per machine and
  event-time bucket, table ``rule-marks``), camera- and machine-scoped rules (table
  ``rule-states``), and the observations line-scoped rules need forwarded to
  ``edgeline.line-observations`` keyed by line (one compact record per line and batch,
  :mod:`stream.line_records`);
* line stage, on ``edgeline.line-observations``: the line-scoped rules (tables
  ``line-rule-states``, ``line-rule-marks``; a line's machines may sit on different partitions,
  hence the repartition);
* liveness, on ``edgeline.heartbeats`` + ``edgeline.events`` + ``edgeline.liveness-checks``: last
  heartbeat arrival per machine (table ``liveness``); a machine silent for ``heartbeat_timeout_s``
  (found by a timer, which sends a check through Kafka so that the table is only written
  in-stream) or whose last-will arrived raises a ``machine-offline`` alert, resolved by its next
  heartbeat.

A batch's outputs are produced at once and acknowledged before the batch ends; the rules stages'
states and dedupe marks are written once per checkpoint, every ``COMMIT_INTERVAL_S``
(:class:`stream.batches.Checkpoint`), and the input offsets are committed after that, only for
records whose outputs, states and marks Kafka has acknowledged, and before a rebalance or a stop
hands the partitions on. Decisions, alerts and commands carry stable ids: a replay after a crash
recomputes the same ids, which consumers dedupe.

When ``stream.webhook`` is set, a second consumer (group ``<group>-webhook``) POSTs every alert
(:mod:`stream.webhook`).

Why not Faust (the first workers ran faust-streaming agents): its per-record path cost about
240 us of the worker's 307 us per message on the replay bench, and its acks and seeks around a
rebalance skipped records, which a batch could only catch after the fact (a rare loss of
decisions across a rebalance remained). A consumer-group worker reading batches is the bare
consumer row of ``bench.central`` plus the tables and the outputs.

A worker that dies without leaving the group (``kill -9``, a lost host) keeps its partitions until
its session times out (``stream.workers.session_timeout_s``, 8 s).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import gc
import itertools
import logging
import math
import signal
import time
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry, Counter, Histogram, Metric, start_http_server
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from stream.batches import Checkpoint, Marks, Offsets, Position, Record
from stream.deadletter import deadletter_record
from stream.line_records import LineItem, decode_line_record, encode_line_record
from stream.messages import Alert, Envelope, Event, Heartbeat, MessageError, parse_message, stable_msg_id
from stream.rules import Observation, RulesEngine, observations
from stream.rules_metrics import EngineStatsCollector
from stream.settings import StreamSite
from stream.tables import CHANGELOG_CONFIG, ChangelogTable, Restorer, changelog_topic
from stream.webhook import WebhookSink

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2,
                   1.3, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
OFFLINE_RULE = "machine-offline"
COMMIT_INTERVAL_S = 1.0
"""How often the worker writes its rules stages' checkpoints (:class:`stream.batches.Checkpoint`)
and then commits what they finished: a crash replays about this much input or a little more."""
GC_THRESHOLDS = (500_000, 20, 100)
"""The garbage collector's generation thresholds in a worker (Python's are 700, 10, 10). A batch
allocates several objects per observation; with the defaults the collections, which walk the
tables' live states and marks, took a sixth of the worker's CPU on the replay bench, and young
collections every 50,000 net allocations still cost about a tenth. Garbage without cycles is
freed at once either way; only cycles wait longer."""
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
TABLES = ("rule-states", "rule-marks", "line-rule-states", "line-rule-marks", "liveness")
Send = tuple[str, bytes, bytes, float | None]
"""A record to produce: topic, key, value, timestamp (s)."""


class WorkerFailed(RuntimeError):
    """The worker must stop and commit nothing more; its records are read again by the next owner."""


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.consumed = Counter("edgeline_worker_messages", "Messages consumed", ["topic"], registry=self.registry)
        self.dead_lettered = Counter("edgeline_worker_dead_lettered", "Messages sent to the dead-letter topic",
                                     ["check"], registry=self.registry)
        self.duplicates = Counter("edgeline_worker_duplicates", "Messages dropped as repeats of a msg_id",
                                  registry=self.registry)
        self.emitted = Counter("edgeline_worker_emitted", "Decisions, alerts and commands produced", ["kind"],
                               registry=self.registry)
        self.latency = BatchHistogram("edgeline_worker_event_latency_seconds",
                                      "Capture time of each frame or sample to its rule evaluation", "kind",
                                      LATENCY_BUCKETS)
        self.registry.register(self.latency)
        self.batch_records = Histogram("edgeline_worker_batch_records", "Records per batch a stage took",
                                       ["agent"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.pipeline_latency = BatchHistogram(
            "edgeline_worker_pipeline_latency_seconds", "Capture time of a message's newest frame or sample (about "
            "when the edge sent it) to its rule evaluation: the pipeline's own delay, without edge grouping",
            "kind", LATENCY_BUCKETS)
        self.registry.register(self.pipeline_latency)
        self.offset_gaps = Counter("edgeline_worker_offset_gaps", "Times an input partition's next record did not "
                                   "come first and the partition was read again from it", registry=self.registry)
        self.restored = Counter("edgeline_worker_restored_records", "Changelog records read to rebuild tables",
                                registry=self.registry)
        self.rebalances = Counter("edgeline_worker_rebalances", "Partition assignments taken", registry=self.registry)


class BatchHistogram:
    """A Prometheus histogram with one label, fed a batch of values at a time: its bucket counts are
    plain lists (a bisect per value), read by the scrape. Why: prometheus_client's ``observe`` takes
    a lock and increments a counter per value, 8 % of the worker's CPU when it observed every frame."""

    def __init__(self, name: str, documentation: str, label: str, buckets: Sequence[float]) -> None:
        self.name = name
        self._documentation = documentation
        self._label = label
        self._bounds = [*buckets, math.inf]
        self._series: dict[str, tuple[list[int], list[float]]] = {}

    def observe_many(self, value: str, observed: Iterable[float]) -> None:
        series = self._series.get(value)
        if series is None:
            series = self._series[value] = ([0] * len(self._bounds), [0.0])
        counts, total = series
        bounds, find = self._bounds, bisect.bisect_left
        added = 0.0
        for x in observed:
            counts[find(bounds, x)] += 1
            added += x
        total[0] += added

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self._documentation, labels=[self._label])
        for value, (counts, total) in list(self._series.items()):
            cumulative = list(itertools.accumulate(list(counts)))
            family.add_metric([value], [(floatToGoString(b), c) for b, c in zip(self._bounds, cumulative)], total[0])
        yield family


@dataclass
class RuleBatch:
    """What a batch of a rules stage gathers before the engine runs: each message's observations
    with the record they came from, and the records to produce."""

    messages: list[tuple[Record, list[Observation]]] = field(default_factory=list)
    origins: dict[int, tuple[Record, Position]] = field(default_factory=dict)
    sends: list[Send] = field(default_factory=list)
    duplicates: int = 0
    """Messages dropped as repeats of a msg_id (counted in the metric once per batch)."""

    def add(self, record: Record, position: Position, observed: list[Observation]) -> None:
        for obs in observed:
            self.origins[id(obs)] = (record, position)
        self.messages.append((record, observed))


def worker_group(topic_prefix: str, site: str) -> str:
    """The consumer group of a site's workers."""
    return f"{topic_prefix}-worker-{site}"


def changelogs(group: str) -> dict[str, Mapping[str, str]]:
    """The changelog topics of a group's tables, with their configs (to create them)."""
    return {changelog_topic(group, name): CHANGELOG_CONFIG for name in TABLES}


class Worker:
    """One worker of a site: :meth:`run` until :meth:`stop`; a failure stops it without committing.
    Made inside a running event loop (aiokafka's clients bind to it)."""

    def __init__(self, site: StreamSite, metrics: WorkerMetrics | None = None) -> None:
        cfg = site.stream
        self.site = site
        self.cfg = cfg
        self.metrics = metrics or WorkerMetrics()
        self.group = worker_group(cfg.topic_prefix, site.site)
        self.topics = cfg.topics()
        self.machine_topics = {self.topics.for_kind("result"), self.topics.for_kind("anomaly")}
        self.liveness_topics = {self.topics.for_kind("heartbeat"), self.topics.for_kind("event"),
                                self.topics.liveness_checks}
        self.outputs = {kind: self.topics.for_kind(kind) for kind in ("decision", "alert", "command")}
        self.by_machine = self._engine(("camera", "machine"))
        self.by_line = self._engine(("line",))
        self.metrics.registry.register(EngineStatsCollector("edgeline_worker",
                                                            lambda: [self.by_machine.stats, self.by_line.stats]))
        self.producer = AIOKafkaProducer(bootstrap_servers=cfg.kafka, client_id=self.group, acks="all",
                                         enable_idempotence=True, linger_ms=5, max_batch_size=256 * 1024)
        self.tables = {name: ChangelogTable(name, changelog_topic(self.group, name), self.producer)
                       for name in TABLES}
        self.checkpoints = {stage: Checkpoint(self.tables[f"{prefix}rule-states"], self.tables[f"{prefix}rule-marks"],
                                              site.engine.dedupe_ttl_s)
                            for stage, prefix in (("machine-stage", ""), ("line-stage", "line-"))}
        self.by_machine.states = self.checkpoints["machine-stage"].states
        self.by_line.states = self.checkpoints["line-stage"].states
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=cfg.kafka, client_id=self.group, group_id=self.group, enable_auto_commit=False,
            auto_offset_reset="earliest", partition_assignment_strategy=(RangePartitionAssignor,),
            session_timeout_ms=int(cfg.workers.session_timeout_s * 1000),
            heartbeat_interval_ms=int(cfg.workers.heartbeat_interval_s * 1000),
            rebalance_timeout_ms=int(cfg.workers.rebalance_timeout_s * 1000),
            max_poll_records=cfg.workers.batch_max, fetch_max_wait_ms=int(cfg.workers.batch_ms))
        self.restorer = Restorer(cfg.kafka, f"{self.group}-restore")
        self.offsets = Offsets()
        self.lock = asyncio.Lock()
        """Held by a batch, a checkpoint, and a rebalance's hand-over and take-over."""
        self.failure: BaseException | None = None
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Consume until :meth:`stop` (then commit what is finished and leave the group), or until
        a failure (raised: nothing more is committed)."""
        await self.producer.start()
        await self.restorer.start()
        self.consumer.subscribe([*sorted(self.machine_topics), self.topics.line_observations,
                                 *sorted(self.liveness_topics)], listener=_Rebalance(self))
        await self.consumer.start()
        failed = True
        try:
            await self._consume()
            failed = False
        finally:
            await self._close(failed)

    async def _consume(self) -> None:
        next_commit = time.monotonic() + COMMIT_INTERVAL_S
        liveness_every = max(0.5, self.cfg.heartbeat_timeout_s / 4)
        next_liveness = time.monotonic() + liveness_every
        while not self._stopping.is_set():
            fetched = await self.consumer.getmany(timeout_ms=int(self.cfg.workers.batch_ms),
                                                  max_records=self.cfg.workers.batch_max)
            self._raise_failure()
            async with self.lock:
                self._raise_failure()
                taken, rewinds = self.offsets.take(fetched.items())
                for tp, offset in rewinds.items():
                    self.metrics.offset_gaps.inc()
                    self.consumer.seek(TopicPartition(tp.topic, tp.partition), offset)
                if taken:
                    await self._within_deadline(taken)
                if time.monotonic() >= next_commit:
                    await self._checkpoint_and_commit()
                    next_commit = time.monotonic() + COMMIT_INTERVAL_S
            if time.monotonic() >= next_liveness:
                await self._check_liveness()
                next_liveness = time.monotonic() + liveness_every

    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise WorkerFailed(f"the worker stops: {self.failure!r}") from self.failure

    async def _within_deadline(self, records: list[Record]) -> None:
        deadline_s = self.cfg.workers.batch_deadline_s
        try:
            await asyncio.wait_for(self._process(records), deadline_s)
        except TimeoutError as exc:
            self.failure = exc
            raise WorkerFailed(f"a batch of {len(records)} records took more than {deadline_s:g} s; the worker "
                               "stops and its records are read again") from exc
        except Exception as exc:
            self.failure = exc
            raise WorkerFailed(f"a batch of {len(records)} records failed; the worker stops and its records "
                               "are read again") from exc

    async def _process(self, records: list[Record]) -> None:
        by_stage: dict[str, list[Record]] = {"machine": [], "line": [], "liveness": []}
        for record in records:
            topic = record.topic
            stage = ("machine" if topic in self.machine_topics else "liveness" if topic in self.liveness_topics
                     else "line")
            by_stage[stage].append(record)
        work = [stage(batch) for stage, batch in ((self._machine_batch, by_stage["machine"]),
                                                  (self._line_batch, by_stage["line"]),
                                                  (self._liveness_batch, by_stage["liveness"])) if batch]
        await asyncio.gather(*work)

    async def _checkpoint_and_commit(self) -> None:
        """Write the checkpoints, then commit every record finished (call with ``lock`` held)."""
        for checkpoint in self.checkpoints.values():
            self.offsets.finished(await checkpoint.flush())
        offsets = self.offsets.to_commit()
        if not offsets:
            return
        try:
            await self.consumer.commit({TopicPartition(tp.topic, tp.partition): o for tp, o in offsets.items()})
        except CommitFailedError as exc:  # the group moved on: the next owner reads these records again
            log.warning("worker: commit refused (%s); its records are read again", exc)

    # ------------------------------------------------------------------ rebalances

    async def hand_over(self) -> None:
        """Partitions revoked: finish what was taken and commit it (nothing after a failure)."""
        try:
            async with self.lock:
                if self.failure is None:
                    await self._checkpoint_and_commit()
                self.offsets.revoke()
        except Exception as exc:  # aiokafka only logs what a listener raises
            log.exception("worker: handing over the partitions failed")
            self.failure = exc

    async def take_over(self, assigned: set[TopicPartition]) -> None:
        """Partitions assigned: their tables restored where others wrote them, then read from their
        committed offsets."""
        try:
            async with self.lock:
                partitions = {tp.partition for tp in assigned}
                restored = await self.restorer.take_over(list(self.tables.values()), partitions)
                self.metrics.restored.inc(restored)
                self.metrics.rebalances.inc()
                self.offsets.assign(await self._starts(assigned))
                log.info("worker: %d partitions assigned (%s), %d changelog records restored", len(assigned),
                         ", ".join(str(p) for p in sorted(partitions)), restored)
        except Exception as exc:
            log.exception("worker: taking over the partitions failed")
            self.failure = exc

    async def _starts(self, assigned: set[TopicPartition]) -> dict[tuple[str, int], int]:
        """Where each assigned partition is read from: its committed offset, or its first record
        when there is none or retention deleted it (not the consumer's position: its fetcher may
        have read ahead already)."""
        earliest = await self.consumer.beginning_offsets(list(assigned))
        starts: dict[tuple[str, int], int] = {}
        for tp in assigned:
            committed = await self.consumer.committed(tp)
            starts[(tp.topic, tp.partition)] = max(earliest[tp], committed or 0)
        return starts

    async def _close(self, failed: bool) -> None:
        if not failed:
            try:
                async with self.lock:
                    await self._checkpoint_and_commit()
            except Exception:
                log.exception("worker: the last checkpoint failed; its records are read again")
        await self.consumer.stop()
        await self.restorer.stop()
        await self.producer.stop()

    # ------------------------------------------------------------------ the stages

    def _engine(self, scopes: tuple[str, ...]) -> RulesEngine:
        site = self.site
        return RulesEngine(site.rules, lines=site.lines(), allowed_lateness_s=site.engine.allowed_lateness_s,
                           max_ahead_s=site.messages.max_ahead_s, scopes=scopes)

    async def _machine_batch(self, records: list[Record]) -> None:
        self._count("machine-stage", records)
        checkpoint = self.checkpoints["machine-stage"]
        async with checkpoint.batch(records) as marks:
            batch, newest = self._machine_records(records, marks)
            await self._decide(self.by_machine, checkpoint, batch)
        self._observe_latency([obs for _, observed in batch.messages for obs in observed], newest)

    def _machine_records(self, records: list[Record], marks: Marks) -> tuple[RuleBatch, list[tuple[str, float]]]:
        """A machine-stage batch parsed and deduped, its line records added to its sends; and the
        kind and newest event time of each message (for the pipeline latency)."""
        batch = RuleBatch()
        newest: list[tuple[str, float]] = []
        for_line: dict[str, list[LineItem]] = {}
        for record in records:
            try:
                message = self._parse(record, ("result", "anomaly"))
            except MessageError as exc:
                batch.sends.append(self._dead_letter(record, exc.reason, exc.check))
                continue
            position = Position.of(record)
            if message.site != self.site.site:
                continue
            if not marks.first(message.machine, message.msg_id, message.ts, record, position):
                batch.duplicates += 1
                continue
            observed = observations(message, self.by_machine.lines)
            batch.add(record, position, observed)
            if observed:
                newest.append((message.KIND, max(o.ts for o in observed)))
            line_obs = [obs for obs in observed if self.by_line.wants(obs)]
            if line_obs:  # a message's observations share a machine, hence a line
                for_line.setdefault(observed[0].line, []).append(LineItem(message.msg_id, message.ts, line_obs))
        for line, items in for_line.items():
            batch.sends.append((self.topics.line_observations, line.encode(),
                                encode_line_record(self.site.site, line, self.by_line.metrics, items),
                                max(i.ts for i in items)))
        return batch, newest

    async def _line_batch(self, records: list[Record]) -> None:
        self._count("line-stage", records)
        checkpoint = self.checkpoints["line-stage"]
        async with checkpoint.batch(records) as marks:
            await self._decide(self.by_line, checkpoint, self._line_records(records, marks))

    def _line_records(self, records: list[Record], marks: Marks) -> RuleBatch:
        """A line-stage batch decoded and deduped."""
        batch = RuleBatch()
        for record in records:
            position = Position.of(record)
            try:
                items = decode_line_record(_value(record))
            except (ValueError, KeyError, TypeError) as exc:
                batch.sends.append(self._dead_letter(record, f"bad line observations: {exc}", "schema"))
                continue
            scope = f"line:{(_key(record)).decode(errors='replace')}"
            for item in items:
                if not marks.first(scope, item.msg_id, item.ts, record, position):
                    batch.duplicates += 1
                    continue
                batch.add(record, position, item.observations)
        return batch

    async def _decide(self, engine: RulesEngine, checkpoint: Checkpoint, batch: RuleBatch) -> None:
        """The engine over a batch's observations on the checkpoint's states (each read once),
        then every output acknowledged by Kafka; the states and marks are written by the
        checkpoint afterwards (a state never covers an input whose outputs could still be lost)."""
        checkpoint.origins = batch.origins
        states = checkpoint.states
        now = time.time()
        emitted: collections.Counter[str] = collections.Counter()
        for record, observed in batch.messages:
            try:
                out = engine.observe_all(observed, now=now, fresh=states.fresh)
                if out:
                    batch.sends += self._output_records(out, emitted)
            except ValueError as exc:  # e.g. a Decision that fails validation
                log.exception("worker: the rules engine failed on a record of %s", record.topic)
                batch.sends.append(self._dead_letter(record, f"rules engine: {exc}", "engine"))
        await self._send_all(batch.sends)
        self._count_emitted(emitted)
        if batch.duplicates:
            self.metrics.duplicates.inc(batch.duplicates)

    async def _liveness_batch(self, records: list[Record]) -> None:
        self._count("liveness", records)
        table = self.tables["liveness"]
        sends: list[Send] = []
        entries: dict[str, Any] = {}
        last_record: dict[str, Record] = {}
        emitted: collections.Counter[str] = collections.Counter()
        for record in records:
            try:
                message = self._parse(record, ("heartbeat", "event"))
            except MessageError as exc:
                sends.append(self._dead_letter(record, exc.reason, exc.check))
                continue
            if message.site != self.site.site:
                continue
            if message.machine not in entries:
                entries[message.machine] = table.get(message.machine, record)
            last_record[message.machine] = record
            sends += self._output_records(update_liveness(entries, message, time.time(), self.cfg.heartbeat_timeout_s),
                                          emitted)
        await self._send_all(sends)
        self._count_emitted(emitted)
        await asyncio.gather(*[table.put(machine, entry, last_record[machine]) for machine, entry in entries.items()])
        self.offsets.finished(records)

    async def _check_liveness(self) -> None:
        """Send a check for every machine silent past the timeout (the liveness stage decides)."""
        now = time.time()
        checks: list[Send] = []
        for machine, entry in self.tables["liveness"].items():
            if entry and not entry["offline"] and now - entry["last"] > self.cfg.heartbeat_timeout_s:
                check = Event(site=entry["site"], machine=machine, ts=now, name="liveness_check")
                checks.append((self.topics.liveness_checks, machine.encode(), check.to_json(), None))
        try:
            await self._send_all(checks)
        except KafkaError as exc:  # the next tick sends them again
            log.warning("worker: liveness checks not sent: %r", exc)

    # ------------------------------------------------------------------ helpers

    async def _send_all(self, sends: Sequence[Send]) -> None:
        """Produce records, then wait until Kafka has acknowledged every one of them."""
        send = self.producer.send
        pending = [await send(topic, value=value, key=key, timestamp_ms=None if ts is None else int(ts * 1000))
                   for topic, key, value, ts in sends]
        if pending:
            await asyncio.gather(*pending)

    def _output_records(self, messages: list[Envelope], emitted: collections.Counter[str]) -> list[Send]:
        """The records of ``messages``, counted per kind in ``emitted`` (the metric is increased
        once per kind and batch, after Kafka acknowledged them)."""
        emitted.update(m.KIND for m in messages)
        return [(self.outputs[m.KIND], m.machine.encode(), m.to_json(), m.ts) for m in messages]

    def _count_emitted(self, emitted: collections.Counter[str]) -> None:
        for kind, n in emitted.items():
            self.metrics.emitted.labels(kind).inc(n)

    def _dead_letter(self, record: Record, reason: str, check: str) -> Send:
        self.metrics.dead_lettered.labels(check).inc()
        log.warning("worker: dead-lettered a record of %s: %s", record.topic, reason)
        return self.topics.deadletter, _key(record), deadletter_record(record.topic, reason, _value(record), check), None

    def _count(self, stage: str, records: Sequence[Record]) -> None:
        self.metrics.batch_records.labels(stage).observe(len(records))
        for topic, n in collections.Counter(record.topic for record in records).items():
            self.metrics.consumed.labels(topic).inc(n)

    def _parse(self, record: Record, kinds: tuple[str, ...]) -> Envelope:
        value = _value(record)
        if not value:
            raise MessageError("record without a value")
        message = parse_message(value, self.site.messages)
        if message.KIND not in kinds:
            raise MessageError(f"a {message.KIND} message on {record.topic}", "topic")
        return message

    def _observe_latency(self, batch: list[Observation], newest: list[tuple[str, float]]) -> None:
        """The latency histograms of a batch, per kind."""
        now = time.time()
        for kind, anomaly in (("result", False), ("anomaly", True)):
            frames = [max(0.0, now - obs.ts) for obs in batch if (obs.group is not None) is anomaly]
            if frames:
                self.metrics.latency.observe_many(kind, frames)
            messages = [max(0.0, now - ts) for of_kind, ts in newest if of_kind == kind]
            if messages:
                self.metrics.pipeline_latency.observe_many(kind, messages)


def _value(record: Record) -> bytes:
    return record.value or b""


def _key(record: Record) -> bytes:
    return record.key or b""


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._worker.hand_over()

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._worker.take_over(set(assigned))


class WebhookForwarder:
    """POSTs every alert to ``stream.webhook`` (its own consumer group): a delivery that fails
    after its retries is dead-lettered; offsets are committed once a batch is delivered."""

    def __init__(self, worker: Worker, sink: WebhookSink) -> None:
        self._worker = worker
        self._sink = sink
        self._consumer = AIOKafkaConsumer(worker.outputs["alert"], bootstrap_servers=worker.cfg.kafka,
                                          group_id=f"{worker.group}-webhook", enable_auto_commit=False,
                                          auto_offset_reset="earliest")

    async def run(self, stopping: asyncio.Event) -> None:
        await self._consumer.start()
        try:
            while not stopping.is_set():
                fetched = await self._consumer.getmany(timeout_ms=200)
                for records in fetched.values():
                    for record in records:
                        await self._deliver(record)
                if fetched:
                    await self._consumer.commit()
        finally:
            await self._consumer.stop()

    async def _deliver(self, record: ConsumerRecord) -> None:
        failure = await self._sink.deliver(_value(record))
        if failure is not None:
            await self._worker._send_all([self._worker._dead_letter(record, f"webhook: {failure}", "webhook")])


def update_liveness(table: MutableMapping[str, Any], message: Envelope, now: float,
                    timeout_s: float) -> list[Alert]:
    """Fold one heartbeat or event into a machine's liveness; the alerts it raises or resolves.

    The entry is ``{"site", "last" (arrival, wall clock), "offline", "since"}``. Pure on the
    mapping, so it is tested without Kafka."""
    machine = message.machine
    entry = table.get(machine) or {"site": message.site, "last": now, "offline": False, "since": now}
    alerts: list[Alert] = []
    if isinstance(message, Heartbeat):
        if entry["offline"]:
            alerts.append(_offline_alert(message.site, machine, "resolved", entry["since"], now - entry["last"], now))
        entry = {"site": message.site, "last": now, "offline": False, "since": now}
    elif isinstance(message, Event) and not entry["offline"]:
        silent = now - entry["last"]
        if message.name == "machine_offline" or (message.name == "liveness_check" and silent > timeout_s):
            entry = entry | {"offline": True, "since": now}
            alerts.append(_offline_alert(message.site, machine, "firing", now, silent, now))
    table[machine] = entry
    return alerts


def _offline_alert(site: str, machine: str, state: str, since: float, silent_s: float, now: float) -> Alert:
    what = (f"{machine} offline: no heartbeat for {silent_s:.0f} s" if state == "firing"
            else f"{machine} back online after {now - since:.0f} s")
    return Alert(msg_id=stable_msg_id(OFFLINE_RULE, machine, state, round(since, 3)), site=site, machine=machine,
                 ts=now, rule=OFFLINE_RULE, state=state, severity="critical", scope="machine", key=machine,
                 value=round(silent_s, 3), text=what)


async def serve(site: StreamSite, metrics: WorkerMetrics) -> None:
    """Run a worker (and its webhook forwarder) until SIGTERM/SIGINT: the batch in hand finishes,
    its checkpoint is written and committed, the group is left and the producer flushed."""
    worker = Worker(site, metrics)
    gc.freeze()  # what startup made lives for good: the collector need not walk it
    gc.set_threshold(*GC_THRESHOLDS)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stop)
    tasks = [asyncio.ensure_future(worker.run())]
    if worker.cfg.webhook is not None:
        tasks.append(asyncio.ensure_future(WebhookForwarder(worker, WebhookSink(worker.cfg.webhook)).run(
            worker._stopping)))
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        worker.stop()
        await asyncio.gather(*tasks, return_exceptions=True)


def run_worker(site: StreamSite, metrics_port: int | None = None) -> None:
    """Run one worker until SIGTERM/SIGINT; exit non-zero when it fails (its supervisor restarts it)."""
    from stream.kafka import ensure_topics

    metrics = WorkerMetrics()
    ensure_topics(site.stream.kafka, site.stream.topics(), site.stream.partitions, site.stream.replication,
                  configured=changelogs(worker_group(site.stream.topic_prefix, site.site)))
    if metrics_port is not None:
        start_http_server(metrics_port, registry=metrics.registry)
    try:
        asyncio.run(serve(site, metrics))
    except WorkerFailed as exc:
        log.error("%s", exc, exc_info=exc.__cause__)
        raise SystemExit(1) from exc
