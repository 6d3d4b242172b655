"""The central stream processor: faust-streaming agents on Kafka around the pure rules engine.

One engine, two runners: this worker drives the same :class:`stream.rules.RulesEngine` as the
embedded runner, with its state in Faust tables (changelog topics in Kafka) instead of memory, so
a restarted or rebalanced worker resumes where the last owner of a partition stopped.

Agents (concurrency 1 each: faust-streaming's offset-commit bug hits higher concurrency; scale out
with partitions and workers):

* ``machine-stage`` on ``edgeline.results`` + ``edgeline.anomalies`` (keyed by machine): parse
  (bad input to ``edgeline.deadletter``, counted), dedupe on ``msg_id`` in an event-time tumbling
  table that expires, camera- and machine-scoped rules (state in table ``rule-states``), and the
  observations line-scoped rules need forwarded to ``edgeline.line-observations`` keyed by line
  (one compact record per line and batch, :mod:`stream.line_records`).
* ``line-stage`` on ``edgeline.line-observations``: the line-scoped rules, state in
  ``line-rule-states`` (a line's machines may sit on different partitions, hence the repartition).
* ``liveness`` on ``edgeline.heartbeats`` + ``edgeline.events`` + ``edgeline.liveness-checks``:
  last heartbeat arrival per machine; a machine silent for ``heartbeat_timeout_s`` (found by a
  timer, which sends a check through Kafka so that the table is only written in-stream) or whose
  last-will arrived raises a ``machine-offline`` alert, resolved by its next heartbeat.
* ``webhook`` on ``edgeline.alerts`` when ``stream.webhook`` is set (:mod:`stream.webhook`).

Each stage takes its records in batches (``stream.workers.batch_max`` / ``batch_ms``), produces each
batch's outputs at once, and writes the rule states and dedupe marks its batches changed once per
checkpoint, every ``COMMIT_INTERVAL_S`` (:class:`stream.batches.Checkpoint`). The worker commits the input
offsets itself, only for batches whose outputs, states and marks Kafka has acknowledged, and
before a rebalance or a stop hands its partitions on (:class:`stream.batches.Progress` says why
Faust's own acks are off for these topics).

Decisions, alerts and commands go to their topics keyed by machine, with stable ids: a restart
that reprocesses input recomputes the same ids, which consumers dedupe.

A worker that dies without leaving the group (``kill -9``, a lost host) keeps its partitions until
its session times out (``stream.workers.session_timeout_s``, 8 s; Faust's own default is 60 s).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust
from aiokafka.errors import IllegalStateError, KafkaError
from prometheus_client import CollectorRegistry, Counter, Histogram, Metric, start_http_server
from prometheus_client.core import CounterMetricFamily

from stream.batches import Checkpoint, FaustTable, Marks, Position, Progress
from stream.deadletter import deadletter_record
from stream.line_records import LineItem, decode_line_record, encode_line_record
from stream.messages import Alert, Envelope, Event, Heartbeat, MessageError, parse_message, stable_msg_id
from stream.rules import Observation, RulesEngine, observations
from stream.rules_metrics import EngineStatsCollector
from stream.settings import StreamSite
from stream.webhook import WebhookSink

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2,
                   1.3, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
OFFLINE_RULE = "machine-offline"
COMMIT_INTERVAL_S = 1.0
"""How often the worker writes its rules stages' checkpoints (:class:`stream.batches.Checkpoint`)
and then commits what they finished: a crash replays about this much input or a little more."""
STALL_CHECK_S = 1.0
"""How often the worker compares its batched partitions with their end offsets in Kafka (its own
timer: the end-offset request must not hold the commits back; under load it took seconds)."""
Send = tuple[faust.TopicT, bytes, bytes, float | None]
"""A record to produce: topic, key, value, timestamp."""
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
Process = Callable[[Sequence[faust.EventT]], Awaitable[Sequence[faust.EventT]]]
"""A stage's work on a batch; the records now finished (their offsets may be committed): the
batch's, or none for a rules stage, whose checkpoint finishes them on the commit timer."""


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
        self.latency = Histogram("edgeline_worker_event_latency_seconds",
                                 "Capture time of each frame or sample to its rule evaluation", ["kind"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_records = Histogram("edgeline_worker_batch_records", "Records per batch an agent took",
                                       ["agent"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.pipeline_latency = Histogram(
            "edgeline_worker_pipeline_latency_seconds", "Capture time of a message's newest frame or sample (about "
            "when the edge sent it) to its rule evaluation: the pipeline's own delay, without edge grouping",
            ["kind"], buckets=LATENCY_BUCKETS, registry=self.registry)


def create_app(site: StreamSite, *, app_id: str | None = None, datadir: Path = Path("edgeline-worker-data"),
               metrics: WorkerMetrics | None = None) -> faust.App:
    """The Faust app of one site's workers; every worker of a site runs the same app id."""
    cfg = site.stream
    metrics = metrics or WorkerMetrics()
    app_id = app_id or f"{cfg.topic_prefix}-worker-{site.site}"
    app = faust.App(
        app_id, broker=[f"kafka://{server}" for server in cfg.kafka.split(",")], store=cfg.store,
        datadir=str(datadir), topic_partitions=cfg.partitions, topic_replication_factor=cfg.replication,
        web_enabled=False, consumer_auto_offset_reset="earliest", broker_commit_interval=COMMIT_INTERVAL_S,
        table_standby_replicas=0, producer_acks=-1, stream_wait_empty=True,
        # a killed worker's partitions move after session_timeout_s (Faust's default: 60 s)
        broker_session_timeout=cfg.workers.session_timeout_s, broker_heartbeat_interval=cfg.workers.heartbeat_interval_s,
        broker_rebalance_timeout=cfg.workers.rebalance_timeout_s,
        producer_linger=0.005,  # batch the many small changelog and output records (5 ms)
    )

    def raw_topic(*names: str, acks: bool = True) -> faust.TopicT:
        return app.topic(*names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                         partitions=cfg.partitions, acks=acks)

    batch_topics: set[str] = set()

    def batch_input(*names: str) -> faust.TopicT:
        """A topic a batched agent reads: Faust's acks off, the worker commits (:class:`Progress`)."""
        batch_topics.update(names)
        return raw_topic(*names, acks=False)

    topics = cfg.topics()
    outputs = {kind: raw_topic(topics.for_kind(kind)) for kind in ("decision", "alert", "command")}
    deadletter = raw_topic(topics.deadletter)
    line_observations = batch_input(topics.line_observations)
    liveness_checks = batch_input(topics.liveness_checks)

    def rule_engine(scopes: tuple[str, ...]) -> RulesEngine:
        return RulesEngine(site.rules, lines=site.lines(), allowed_lateness_s=site.engine.allowed_lateness_s,
                           max_ahead_s=site.messages.max_ahead_s, scopes=scopes)

    by_machine, by_line = rule_engine(("camera", "machine")), rule_engine(("line",))
    line_metrics = by_line.metrics
    metrics.registry.register(EngineStatsCollector("edgeline_worker", lambda: [by_machine.stats, by_line.stats]))
    tables = {name: FaustTable(app.Table(name, default=None, partitions=cfg.partitions))
              for name in ("rule-states", "rule-marks", "line-rule-states", "line-rule-marks")}
    checkpoints = {stage: Checkpoint(tables[f"{prefix}rule-states"], tables[f"{prefix}rule-marks"],
                                     site.engine.dedupe_ttl_s)
                   for stage, prefix in (("machine-stage", ""), ("line-stage", "line-"))}
    by_machine.states, by_line.states = checkpoints["machine-stage"].states, checkpoints["line-stage"].states
    liveness = app.Table("liveness", default=None, partitions=cfg.partitions)
    liveness_writes = FaustTable(liveness)
    batch_max, batch_s = cfg.workers.batch_max, cfg.workers.batch_ms / 1000.0
    deadline_s = cfg.workers.batch_deadline_s
    # where Faust's seek to the committed offsets put each partition at the start of a generation
    progress = Progress(start_of=lambda tp: app.consumer._committed_offset.get(tp))
    running: set[asyncio.Future[None]] = set()
    watchdogs: set[asyncio.Future[None]] = set()
    """A worker's stop on a batch past its deadline, while it runs (the loop keeps only weak references)."""
    metrics.registry.register(_GapsCollector(progress))

    async def send_all(sends: list[Send]) -> None:
        """Produce a batch's records, then wait until Kafka has acknowledged every one of them."""
        pending = [await topic.send(key=key, value=value, timestamp=ts) for topic, key, value, ts in sends]
        if pending:
            await asyncio.gather(*pending)

    async def batches(stream: faust.StreamT, process: Process) -> None:
        """Run ``process`` on each batch of ``stream`` that :class:`Progress` lets it take, one at a
        time and in order, while Faust gathers the next: it fills its take buffer only while this
        loop is outside its body, so waiting for a batch in there left every batch's outputs' acks
        and the take's ``batch_ms`` as idle time one after the other. A stop while a batch runs
        lets it finish; a failed one stops the worker: its records are not committed, and the next
        owner of their partitions reads them again."""
        previous: asyncio.Future[None] | None = None
        async for events in stream.take_events(batch_max, batch_s):
            if previous is not None:
                await let_finish(previous)
                if previous.cancelled():
                    return  # given up past its deadline: the worker stops
            taken = progress.take(events, app.consumer_generation_id)
            await rewind_skipped()
            if taken:
                previous = start_batch(process, taken)
        if previous is not None:
            await let_finish(previous)

    def start_batch(process: Process, taken: list[faust.EventT]) -> asyncio.Future[None]:
        task = asyncio.ensure_future(finish(process, taken))
        running.add(task)
        task.add_done_callback(running.discard)
        why = f"a batch of {len(taken)} records took more than {deadline_s:g} s"

        def past_deadline() -> None:
            if not task.done():
                watchdogs.add(stopping := asyncio.ensure_future(give_up(task, why, TimeoutError(why))))
                stopping.add_done_callback(watchdogs.discard)

        watchdog = asyncio.get_running_loop().call_later(deadline_s, past_deadline)
        task.add_done_callback(lambda _: watchdog.cancel())
        return task

    async def let_finish(task: asyncio.Future[None]) -> None:
        """Wait for a batch; cancelling this wait (a stop) leaves it running, for up to its deadline."""
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            await asyncio.wait([task], timeout=deadline_s)
            raise

    async def give_up(task: asyncio.Future[None], why: str, exc: BaseException) -> None:
        """Stop the worker on a batch stuck past its deadline (seen in the bench: a worker whose
        first batch never finished, its producer busy with cluster metadata, and whose stop then
        waited for that batch for good); nothing of it or after it is committed."""
        task.cancel()
        await stop_worker(app.consumer_generation_id, why, exc)

    async def stop_worker(generation: int, why: str, exc: BaseException) -> None:
        """Crash the app on ``exc``; nothing of ``generation`` is committed any more (a later
        batch or checkpoint would cover the offsets of records whose work was lost), and the
        records not committed are read again by the next owner of their partitions."""
        progress.close(generation)
        log.error("worker: %s; the worker stops and its records are read again", why, exc_info=exc)
        await app.crash(exc)

    async def rewind_skipped() -> None:
        """Read each partition that skipped a record again from it (from its earliest record if
        that one is gone). The seek runs on the consumer's own thread (``seek_wait``): Faust's
        ``seek`` changes aiokafka's fetcher from this one while that thread iterates it (CI:
        ``KeyError`` in ``fetched_records``, the worker crashed)."""
        for tp, offset in progress.rewinds(time.monotonic()).items():
            earliest = (await app.consumer.earliest_offsets(tp)).get(tp) or 0
            start = max(offset, earliest)
            progress.rewound(tp, start)
            try:
                await app.consumer.seek_wait({tp: start})
            except IllegalStateError:
                log.info("worker: %s was revoked before its seek to %d; its next owner reads it", tp, start)

    async def finish(process: Process, events: Sequence[faust.EventT]) -> None:
        generation = app.consumer_generation_id
        try:
            finished = await process(events)
        except Exception as exc:
            await stop_worker(generation, f"a batch of {len(events)} records failed", exc)
            raise
        progress.finished(finished)

    async def checkpoint_all() -> None:
        generation = app.consumer_generation_id
        for checkpoint in checkpoints.values():
            try:
                progress.finished(await checkpoint.flush())
            except Exception as exc:
                await stop_worker(generation, "a checkpoint's writes failed", exc)
                raise

    async def commit_finished() -> None:
        offsets = progress.to_commit()
        if offsets:
            await app.consumer._commit_offsets(offsets)  # faust's commit of given offsets (producer flushed first)

    async def let_partitions_go(*_args: Any, **_kwargs: Any) -> None:
        """Before a rebalance (or a stop) hands the partitions on: no batch starts, the running
        ones finish, and what they finished is committed, so the next owner starts after it."""
        progress.close(app.consumer_generation_id)
        if running:
            _, stuck = await asyncio.wait(list(running), timeout=deadline_s)
            for task in stuck:
                log.error("worker: a batch still running after %g s is abandoned uncommitted", deadline_s)
                task.cancel()
        await checkpoint_all()
        await commit_finished()

    app.on_partitions_revoked.connect(let_partitions_go)
    app.on_before_shutdown.connect(let_partitions_go)

    @app.timer(interval=COMMIT_INTERVAL_S)
    async def commit_periodically() -> None:
        await rewind_skipped()  # a partition whose records stopped coming after a lost seek
        await checkpoint_all()
        await commit_finished()

    @app.timer(interval=STALL_CHECK_S)
    async def find_stalled() -> None:
        """Hand :meth:`Progress.stalled` the end offsets of the batched partitions assigned now
        (not while a rebalance or the tables' recovery holds the streams back)."""
        if app.rebalancing or app.in_recovery:
            return
        generation = app.consumer_generation_id
        assigned = [tp for tp in app.consumer.assignment() if tp.topic in batch_topics]
        if not assigned:
            return
        try:
            ends = await app.consumer.highwaters(*assigned)
        except (KafkaError, IllegalStateError) as exc:  # a rebalance under way: the next tick asks again
            log.info("worker: no end offsets for the stall check: %r", exc)
            return
        if generation == app.consumer_generation_id:
            progress.stalled(ends, generation, time.monotonic())

    def output_records(messages: list[Envelope], emitted: collections.Counter[str]) -> list[Send]:
        """The records of ``messages``, counted per kind in ``emitted`` (the metric is increased
        once per kind and batch, after Kafka acknowledged them: :func:`count_emitted`)."""
        emitted.update(m.KIND for m in messages)
        return [(outputs[m.KIND], m.machine.encode(), m.to_json(), m.ts) for m in messages]

    def count_emitted(emitted: collections.Counter[str]) -> None:
        for kind, n in emitted.items():
            metrics.emitted.labels(kind).inc(n)

    def dead_letter(event: faust.EventT, reason: str, check: str) -> tuple[faust.TopicT, bytes, bytes, None]:
        metrics.dead_lettered.labels(check).inc()
        log.warning("worker: dead-lettered a record of %s: %s", event.message.topic, reason)
        record = deadletter_record(event.message.topic, reason, bytes(event.value or b""), check)
        return deadletter, event.key or b"", record, None

    def count(agent: str, events: Sequence[faust.EventT]) -> None:
        metrics.batch_records.labels(agent).observe(len(events))
        for topic, n in collections.Counter(event.message.topic for event in events).items():
            metrics.consumed.labels(topic).inc(n)

    def parse(event: faust.EventT, kinds: tuple[str, ...]) -> Envelope:
        if not isinstance(event.value, bytes | bytearray):
            raise MessageError("record without a value")
        message = parse_message(bytes(event.value), site.messages)
        if message.KIND not in kinds:
            raise MessageError(f"a {message.KIND} message on {event.message.topic}", "topic")
        return message

    async def decide(engine: RulesEngine, checkpoint: Checkpoint, batch: RuleBatch) -> None:
        """The engine over a batch's observations on the checkpoint's states (each read once),
        then every output acknowledged by Kafka; the states and marks are written by the
        checkpoint afterwards (a state never covers an input whose outputs could still be lost)."""
        checkpoint.origins = batch.origins
        states = checkpoint.states
        now = time.time()
        emitted: collections.Counter[str] = collections.Counter()
        for event, observed in batch.messages:
            try:
                batch.sends += output_records(engine.observe_all(observed, now=now, fresh=states.fresh), emitted)
            except ValueError as exc:  # e.g. a Decision that fails validation
                log.exception("worker: the rules engine failed on a record of %s", event.message.topic)
                batch.sends.append(dead_letter(event, f"rules engine: {exc}", "engine"))
        await send_all(batch.sends)
        count_emitted(emitted)
        if batch.duplicates:
            metrics.duplicates.inc(batch.duplicates)

    @app.agent(batch_input(topics.for_kind("result"), topics.for_kind("anomaly")), name="machine-stage", concurrency=1)
    async def machine_stage(stream: faust.StreamT) -> None:
        await batches(stream, machine_batch)

    async def machine_batch(events: Sequence[faust.EventT]) -> list[faust.EventT]:
        count("machine-stage", events)
        checkpoint = checkpoints["machine-stage"]
        async with checkpoint.batch(events) as marks:
            batch, newest = machine_records(events, marks)
            await decide(by_machine, checkpoint, batch)
        observe_latency([obs for _, observed in batch.messages for obs in observed], newest)
        return []  # finished by the checkpoint (commit timer)

    def machine_records(events: Sequence[faust.EventT], marks: Marks) -> tuple[RuleBatch, list[tuple[str, float]]]:
        """A machine-stage batch parsed and deduped, its line records added to its sends; and the
        kind and newest event time of each message (for the pipeline latency)."""
        batch = RuleBatch()
        newest: list[tuple[str, float]] = []
        for_line: dict[str, list[LineItem]] = {}
        for event in events:
            try:
                message = parse(event, ("result", "anomaly"))
            except MessageError as exc:
                batch.sends.append(dead_letter(event, exc.reason, exc.check))
                continue
            position = Position.of(event)
            if message.site != site.site:
                continue
            if not marks.first(message.machine, message.msg_id, message.ts, event, position):
                batch.duplicates += 1
                continue
            observed = observations(message, by_machine.lines)
            batch.add(event, position, observed)
            if observed:
                newest.append((message.KIND, max(o.ts for o in observed)))
            line_obs = [obs for obs in observed if by_line.wants(obs)]
            if line_obs:  # a message's observations share a machine, hence a line
                for_line.setdefault(observed[0].line, []).append(LineItem(message.msg_id, message.ts, line_obs))
        for line, items in for_line.items():
            batch.sends.append((line_observations, line.encode(),
                                encode_line_record(site.site, line, line_metrics, items), max(i.ts for i in items)))
        return batch, newest

    def observe_latency(batch: list[Observation], newest: list[tuple[str, float]]) -> None:
        """The latency histograms of a batch, each label's series looked up once."""
        now = time.time()
        per_frame = {kind: metrics.latency.labels(kind) for kind in ("result", "anomaly")}
        for obs in batch:
            per_frame["anomaly" if obs.group is not None else "result"].observe(max(0.0, now - obs.ts))
        per_message = {kind: metrics.pipeline_latency.labels(kind) for kind in {kind for kind, _ in newest}}
        for kind, ts in newest:
            per_message[kind].observe(max(0.0, now - ts))

    @app.agent(line_observations, name="line-stage", concurrency=1)
    async def line_stage(stream: faust.StreamT) -> None:
        await batches(stream, line_batch)

    async def line_batch(events: Sequence[faust.EventT]) -> list[faust.EventT]:
        count("line-stage", events)
        checkpoint = checkpoints["line-stage"]
        async with checkpoint.batch(events) as marks:
            await decide(by_line, checkpoint, line_records(events, marks))
        return []  # finished by the checkpoint (commit timer)

    def line_records(events: Sequence[faust.EventT], marks: Marks) -> RuleBatch:
        """A line-stage batch decoded and deduped."""
        batch = RuleBatch()
        for event in events:
            position = Position.of(event)
            try:
                items = decode_line_record(event.value)
            except (ValueError, KeyError, TypeError) as exc:
                batch.sends.append(dead_letter(event, f"bad line observations: {exc}", "schema"))
                continue
            scope = f"line:{(event.key or b'').decode(errors='replace')}"
            for item in items:
                if not marks.first(scope, item.msg_id, item.ts, event, position):
                    batch.duplicates += 1
                    continue
                batch.add(event, position, item.observations)
        return batch

    @app.agent(batch_input(topics.for_kind("heartbeat"), topics.for_kind("event"), topics.liveness_checks),
               name="liveness", concurrency=1)
    async def liveness_stage(stream: faust.StreamT) -> None:
        await batches(stream, liveness_batch)

    async def liveness_batch(events: Sequence[faust.EventT]) -> Sequence[faust.EventT]:
        count("liveness", events)
        sends: list[Send] = []
        entries: dict[str, Any] = {}
        last_event: dict[str, faust.EventT] = {}
        emitted: collections.Counter[str] = collections.Counter()
        for event in events:
            try:
                message = parse(event, ("heartbeat", "event"))
            except MessageError as exc:
                sends.append(dead_letter(event, exc.reason, exc.check))
                continue
            if message.site != site.site:
                continue
            if message.machine not in entries:
                entries[message.machine] = liveness_writes.get(message.machine, event)
            last_event[message.machine] = event
            sends += output_records(update_liveness(entries, message, time.time(), cfg.heartbeat_timeout_s), emitted)
        await send_all(sends)
        count_emitted(emitted)
        await asyncio.gather(*[liveness_writes.put(machine, entry, last_event[machine])
                               for machine, entry in entries.items()])
        return events

    @app.timer(interval=max(0.5, cfg.heartbeat_timeout_s / 4))
    async def find_silent_machines() -> None:
        now = time.time()
        for machine, entry in list(liveness.items()):
            if entry and not entry["offline"] and now - entry["last"] > cfg.heartbeat_timeout_s:
                check = Event(site=entry["site"], machine=machine, ts=now, name="liveness_check")
                await liveness_checks.send(key=machine.encode(), value=check.to_json())

    if cfg.webhook is not None:
        sink = WebhookSink(cfg.webhook)

        @app.agent(raw_topic(topics.for_kind("alert")), name="webhook", concurrency=1)
        async def webhook(stream: faust.StreamT) -> None:
            async for event in stream.events():
                failure = await sink.deliver(event.value)
                if failure is not None:
                    await send_all([dead_letter(event, f"webhook: {failure}", "webhook")])

    return app


@dataclass
class RuleBatch:
    """What a batch of a rules stage gathers before the engine runs: each message's observations
    with the record they came from, and the records to produce."""

    messages: list[tuple[faust.EventT, list[Observation]]] = field(default_factory=list)
    origins: dict[int, tuple[faust.EventT, Position]] = field(default_factory=dict)
    sends: list[Send] = field(default_factory=list)
    duplicates: int = 0
    """Messages dropped as repeats of a msg_id (counted in the metric once per batch)."""

    def add(self, event: faust.EventT, position: Position, observed: list[Observation]) -> None:
        for obs in observed:
            self.origins[id(obs)] = (event, position)
        self.messages.append((event, observed))


class _GapsCollector:
    """``edgeline_worker_offset_gaps_total``: times Faust skipped an input record (or a partition
    stalled) and the worker read its partition again from it (:class:`stream.batches.Progress`)."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily("edgeline_worker_offset_gaps", "Times an input partition jumped over a record "
                                     "Faust skipped, or took none of the records Kafka held for it for a while, and "
                                     "was read again from it")
        family.add_metric([], self._progress.gaps)
        yield family


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


def run_worker(site: StreamSite, datadir: Path, metrics_port: int | None = None, loglevel: str = "info") -> None:
    """Run one worker until SIGTERM/SIGINT (Faust's own worker: signal handling, ordered shutdown,
    offsets committed and the producer flushed on the way out)."""
    from stream.kafka import ensure_topics

    ensure_topics(site.stream.kafka, site.stream.topics(), site.stream.partitions, site.stream.replication)
    metrics = WorkerMetrics()
    if metrics_port is not None:
        start_http_server(metrics_port, registry=metrics.registry)
    app = create_app(site, datadir=datadir, metrics=metrics)
    worker = faust.Worker(app, loglevel=loglevel.upper(), quiet=True, override_logging=False)
    worker.execute_from_commandline()
