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
  (one record per message).
* ``line-stage`` on ``edgeline.line-observations``: the line-scoped rules, state in
  ``line-rule-states`` (a line's machines may sit on different partitions, hence the repartition).
* ``liveness`` on ``edgeline.heartbeats`` + ``edgeline.events`` + ``edgeline.liveness-checks``:
  last heartbeat arrival per machine; a machine silent for ``heartbeat_timeout_s`` (found by a
  timer, which sends a check through Kafka so that the table is only written in-stream) or whose
  last-will arrived raises a ``machine-offline`` alert, resolved by its next heartbeat.
* ``webhook`` on ``edgeline.alerts`` when ``stream.webhook`` is set (:mod:`stream.webhook`).

Decisions, alerts and commands go to their topics keyed by machine, with stable ids: a restart
that reprocesses input recomputes the same ids, which consumers dedupe.

A worker that dies without leaving the group (``kill -9``, a lost host) keeps its partitions until
its session times out (``stream.workers.session_timeout_s``, 8 s; Faust's own default is 60 s).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import faust
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from stream.deadletter import deadletter_record
from stream.messages import Alert, Envelope, Event, Heartbeat, MessageError, parse_message, stable_msg_id
from stream.rules import Observation, RulesEngine, RuleState, observations
from stream.rules_metrics import EngineStatsCollector
from stream.settings import StreamSite
from stream.webhook import WebhookSink

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2,
                   1.3, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
OFFLINE_RULE = "machine-offline"


class TableStates(MutableMapping[str, RuleState]):
    """Rule states kept in a Faust table as JSON-ready dicts (written back on every update)."""

    def __init__(self, table: Any) -> None:
        self._table = table

    def __getitem__(self, key: str) -> RuleState:
        return RuleState.from_dict(self._table[key])

    def __setitem__(self, key: str, state: RuleState) -> None:
        self._table[key] = state.to_dict()

    def __delitem__(self, key: str) -> None:
        del self._table[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


class TableDeduper:
    """``msg_id`` dedupe on a tumbling event-time table: an id counts as seen in its window and
    the one before, and windows expire, so the table stays bounded."""

    def __init__(self, table: Any, ttl_s: float) -> None:
        self._table = table
        self._ttl_s = ttl_s

    def seen(self, msg_id: str, now: float) -> bool:
        windows = self._table[msg_id]
        if windows.current() or windows.delta(self._ttl_s):
            return True
        self._table[msg_id] = 1
        return False


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
        web_enabled=False, consumer_auto_offset_reset="earliest", broker_commit_interval=1.0,
        table_standby_replicas=0, producer_acks=-1, stream_wait_empty=True,
        # a killed worker's partitions move after session_timeout_s (Faust's default: 60 s)
        broker_session_timeout=cfg.workers.session_timeout_s, broker_heartbeat_interval=cfg.workers.heartbeat_interval_s,
        broker_rebalance_timeout=cfg.workers.rebalance_timeout_s,
        producer_linger=0.005,  # batch the many small changelog and output records (5 ms)
    )

    def raw_topic(*names: str) -> faust.TopicT:
        return app.topic(*names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                         partitions=cfg.partitions)

    topics = cfg.topics()
    outputs = {kind: raw_topic(topics.for_kind(kind)) for kind in ("decision", "alert", "command")}
    deadletter = raw_topic(topics.deadletter)
    line_observations = raw_topic(topics.line_observations)
    liveness_checks = raw_topic(topics.liveness_checks)

    def rule_engine(scopes: tuple[str, ...], table: str) -> RulesEngine:
        seen = app.Table(f"{table}-seen", default=int, partitions=cfg.partitions).tumbling(
            site.engine.dedupe_ttl_s, expires=2 * site.engine.dedupe_ttl_s).relative_to_stream()
        states = app.Table(table, default=None, partitions=cfg.partitions)
        return RulesEngine(site.rules, lines=site.lines(), allowed_lateness_s=site.engine.allowed_lateness_s,
                           max_ahead_s=site.messages.max_ahead_s, scopes=scopes, states=TableStates(states),
                           deduper=TableDeduper(seen, site.engine.dedupe_ttl_s))

    by_machine = rule_engine(("camera", "machine"), "rule-states")
    by_line = rule_engine(("line",), "line-rule-states")
    metrics.registry.register(EngineStatsCollector("edgeline_worker", lambda: [by_machine.stats, by_line.stats]))
    liveness = app.Table("liveness", default=None, partitions=cfg.partitions)

    async def emit(message: Envelope) -> None:
        await outputs[message.KIND].send(key=message.machine.encode(), value=message.to_json(), timestamp=message.ts)
        metrics.emitted.labels(message.KIND).inc()

    async def dead_letter(event: faust.EventT, reason: str, check: str = "schema") -> None:
        metrics.dead_lettered.labels(check).inc()
        log.warning("worker: dead-lettered a record of %s: %s", event.message.topic, reason)
        record = deadletter_record(event.message.topic, reason, bytes(event.value or b""), check)
        await deadletter.send(key=event.key or b"", value=record)

    async def evaluate(event: faust.EventT, engine: RulesEngine, batch: list[Observation]) -> None:
        """Run a message's observations through the rules and emit what they cause; an engine
        failure dead-letters the record with the reason instead of crashing the agent."""
        try:
            outputs = engine.observe_all(batch, now=time.time())
        except ValueError as exc:  # e.g. a Decision that fails validation
            log.exception("worker: the rules engine failed on a record of %s", event.message.topic)
            await dead_letter(event, f"rules engine: {exc}", "engine")
            return
        for output in outputs:
            await emit(output)

    def parse(event: faust.EventT, kinds: tuple[str, ...]) -> Envelope:
        metrics.consumed.labels(event.message.topic).inc()
        if not isinstance(event.value, bytes | bytearray):
            raise MessageError("record without a value")
        message = parse_message(bytes(event.value), site.messages)
        if message.KIND not in kinds:
            raise MessageError(f"a {message.KIND} message on {event.message.topic}", "topic")
        return message

    async def site_messages(stream: faust.StreamT,
                            kinds: tuple[str, ...]) -> AsyncIterator[tuple[faust.EventT, Envelope]]:
        """The stream's valid messages of ``kinds`` for this site, each with its record; bad
        records are dead-lettered, other sites' messages (sharing the topics) skipped."""
        async for event in stream.events():
            try:
                message = parse(event, kinds)
            except MessageError as exc:
                await dead_letter(event, exc.reason, exc.check)
                continue
            if message.site == site.site:
                yield event, message

    @app.agent(raw_topic(topics.for_kind("result"), topics.for_kind("anomaly")), name="machine-stage", concurrency=1)
    async def machine_stage(stream: faust.StreamT) -> None:
        async for event, message in site_messages(stream, ("result", "anomaly")):
            if not by_machine.accept(message):
                metrics.duplicates.inc()
                continue
            batch = observations(message, by_machine.lines)
            await evaluate(event, by_machine, batch)
            now = time.time()
            for obs in batch:
                metrics.latency.labels(message.KIND).observe(max(0.0, now - obs.ts))
            if batch:
                metrics.pipeline_latency.labels(message.KIND).observe(max(0.0, now - max(o.ts for o in batch)))
            for_line = [obs.to_dict() for obs in batch if by_line.wants(obs)]
            if for_line:  # one record per message: a message's observations share a machine, so a line
                forwarded = {"msg_id": message.msg_id, "ts": message.ts, "observations": for_line}
                await line_observations.send(key=batch[0].line.encode(), value=json.dumps(forwarded).encode(),
                                             timestamp=message.ts)

    @app.agent(line_observations, name="line-stage", concurrency=1)
    async def line_stage(stream: faust.StreamT) -> None:
        async for event in stream.events():
            metrics.consumed.labels(event.message.topic).inc()
            try:
                forwarded = json.loads(event.value)
                batch = [Observation.from_dict(obs) for obs in forwarded["observations"]]
                msg_id, ts = str(forwarded["msg_id"]), float(forwarded["ts"])
            except (ValueError, KeyError, TypeError) as exc:
                await dead_letter(event, f"bad line observations: {exc}")
                continue
            if not by_line.first_time(msg_id, ts):
                metrics.duplicates.inc()
                continue
            await evaluate(event, by_line, batch)

    @app.agent(raw_topic(topics.for_kind("heartbeat"), topics.for_kind("event"), topics.liveness_checks), name="liveness", concurrency=1)
    async def liveness_stage(stream: faust.StreamT) -> None:
        async for _, message in site_messages(stream, ("heartbeat", "event")):
            for alert in update_liveness(liveness, message, time.time(), cfg.heartbeat_timeout_s):
                await emit(alert)

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
                    await dead_letter(event, f"webhook: {failure}", "webhook")

    return app


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
