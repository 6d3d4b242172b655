"""The alerts central keeps, and what operators do with them (acknowledge, shelve: ISA-18.2's alarm
states, and EEMUA 191's alarm-rate figures).

An **episode** opens when a rule fires for a scope key (rule, scope, key) and closes when that rule
resolves for it; its id is the msg_id of the alert that fired it. Every change is an entry of its
history, each with its time: ``firing``, ``resolved``, ``acknowledged`` (by whom, a note),
``shelved`` (until when, by whom, a note), ``unshelved``, ``note``. Alert messages are deduped on
their msg_id (a redelivered alert changes nothing); a ``resolved`` with no open episode (central
was away when it fired) is kept as an episode of its own, already resolved.

Evidence is linked when read (:meth:`central.evidence.EvidenceArchive.linked`): the records of the
episode's machine (its camera, for a camera-scope alert; any machine of its line, for a line-scope
one) captured from shortly before it fired until it resolved (or now).

KPIs (:meth:`AlertStore.kpis`): episodes fired in the last 10 minutes on the site and per line
(EEMUA 191's figure: an average of at most one alarm per 10 minutes per operator is acceptable),
standing alarms (not acknowledged and not shelved) and the "bad actors": the rule and key with the
most episodes in the last 24 hours.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

import paho.mqtt.client as paho

from sqlalchemy import Engine, Float, Integer, String, Text, func, select
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from central.registry import Base
from stream.messages import Alert, MessageError, parse_message
from stream.service import Service, Supervisor
from stream.topics import mqtt_topic, parse_topic

log = logging.getLogger(__name__)

KPI_WINDOW_S = 600.0
BAD_ACTORS_WINDOW_S = 86_400.0
EEMUA_ALARMS_PER_10_MIN = 1.0
"""EEMUA 191: an average of at most one alarm per 10 minutes per operator is acceptable."""
Filter = Literal["firing", "resolved", "standing", "shelved"]


class AlertRow(Base):
    __tablename__ = "alerts"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    site: Mapped[str] = mapped_column(String(64))
    rule: Mapped[str] = mapped_column(String(64), index=True)
    scope: Mapped[str] = mapped_column(String(16))
    key: Mapped[str] = mapped_column(String(200), index=True)
    machine: Mapped[str] = mapped_column(String(64), index=True)
    camera: Mapped[str | None] = mapped_column(String(64), nullable=True)
    line: Mapped[str] = mapped_column(String(64), default="", index=True)
    severity: Mapped[str] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text, default="")
    value: Mapped[float] = mapped_column(Float)
    fired_at: Mapped[float] = mapped_column(Float, index=True)
    resolved_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    acknowledged_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    acknowledged_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    shelved_until: Mapped[float | None] = mapped_column(Float, nullable=True)


class AlertEventRow(Base):
    __tablename__ = "alert_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    alert_id: Mapped[str] = mapped_column(String(128), index=True)
    ts: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(16))
    by: Mapped[str] = mapped_column(String(64), default="")
    note: Mapped[str] = mapped_column(Text, default="")
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    until: Mapped[float | None] = mapped_column(Float, nullable=True)
    msg_id: Mapped[str | None] = mapped_column(String(128), nullable=True, unique=True)
    """The alert message this entry came from (None for an operator's action): the dedupe key."""


class AlertError(ValueError):
    """An operation central refuses; ``status`` is the HTTP status it maps to."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class AlertStore:
    """Episodes and their history in SQL (see the module docstring). ``line_of(machine)`` is the
    machine's line in the fleet registry ('' when it has none)."""

    def __init__(self, engine: Engine, line_of: Callable[[str], str]) -> None:
        Base.metadata.create_all(engine, tables=[AlertRow.__table__, AlertEventRow.__table__])
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self.line_of = line_of
        self.recorded = 0
        self.duplicates = 0
        self.rejected: Counter[str] = Counter()
        """Alert messages dropped before the store, by reason (invalid, identity)."""
        self._lock = threading.Lock()

    # ------------------------------------------------------------ from the rules engines

    def record(self, alert: Alert) -> str | None:
        """Fold one alert message in; the episode's id, or None for a message already recorded."""
        with self._lock, self.sessions() as session:
            if session.scalar(select(AlertEventRow.id).where(AlertEventRow.msg_id == alert.msg_id)) is not None:
                self.duplicates += 1
                return None
            episode = session.scalars(select(AlertRow).where(
                AlertRow.rule == alert.rule, AlertRow.scope == alert.scope, AlertRow.key == alert.key,
                AlertRow.resolved_at.is_(None)).order_by(AlertRow.fired_at.desc()).limit(1)).first()
            if alert.state == "firing" or episode is None:
                episode = self._open(alert)
                session.add(episode)
            if alert.state == "resolved":
                episode.resolved_at = alert.ts
            episode.value, episode.severity = alert.value, alert.severity
            session.add(AlertEventRow(alert_id=episode.id, ts=alert.ts, kind=alert.state, value=alert.value,
                                      note=alert.text, msg_id=alert.msg_id))
            session.commit()
            self.recorded += 1
            return episode.id

    def _open(self, alert: Alert) -> AlertRow:
        return AlertRow(id=alert.msg_id, site=alert.site, rule=alert.rule, scope=alert.scope, key=alert.key,
                        machine=alert.machine, camera=alert.camera,
                        line=alert.line or self.line_of(alert.machine), severity=alert.severity, text=alert.text,
                        value=alert.value, fired_at=alert.ts)

    # ------------------------------------------------------------ operators

    def acknowledge(self, alert_id: str, by: str, note: str = "", now: float | None = None) -> dict[str, Any]:
        def change(row: AlertRow, ts: float) -> AlertEventRow:
            if row.acknowledged_at is not None:
                raise AlertError(409, f"alert {alert_id} was acknowledged by {row.acknowledged_by}")
            row.acknowledged_at, row.acknowledged_by = ts, by
            return AlertEventRow(alert_id=alert_id, ts=ts, kind="acknowledged", by=by, note=note)

        return self._change(alert_id, change, now)

    def shelve(self, alert_id: str, by: str, until: float, note: str = "", now: float | None = None) -> dict[str, Any]:
        def change(row: AlertRow, ts: float) -> AlertEventRow:
            if until <= ts:
                raise AlertError(422, "shelve until a time in the future")
            row.shelved_until = until
            return AlertEventRow(alert_id=alert_id, ts=ts, kind="shelved", by=by, note=note, until=until)

        return self._change(alert_id, change, now)

    def unshelve(self, alert_id: str, by: str, now: float | None = None) -> dict[str, Any]:
        def change(row: AlertRow, ts: float) -> AlertEventRow:
            if row.shelved_until is None or row.shelved_until <= ts:
                raise AlertError(409, f"alert {alert_id} is not shelved")
            row.shelved_until = None
            return AlertEventRow(alert_id=alert_id, ts=ts, kind="unshelved", by=by)

        return self._change(alert_id, change, now)

    def note(self, alert_id: str, by: str, note: str, now: float | None = None) -> dict[str, Any]:
        """A note in the alert's history (what was found, what was done), its state unchanged."""
        def change(row: AlertRow, ts: float) -> AlertEventRow:
            if not note.strip():
                raise AlertError(422, "an empty note")
            return AlertEventRow(alert_id=alert_id, ts=ts, kind="note", by=by, note=note)

        return self._change(alert_id, change, now)

    def _change(self, alert_id: str, change: Callable[[AlertRow, float], AlertEventRow],
                now: float | None) -> dict[str, Any]:
        ts = time.time() if now is None else now
        with self._lock, self.sessions() as session:
            row = session.get(AlertRow, alert_id)
            if row is None:
                raise AlertError(404, f"no alert {alert_id!r}")
            session.add(change(row, ts))
            session.commit()
            return alert_dict(row, ts)

    # ------------------------------------------------------------ reads

    def alerts(self, *, state: Filter | None = None, severity: str | None = None, machine: str | None = None,
               line: str | None = None, rule: str | None = None, since: float | None = None, limit: int = 100,
               now: float | None = None) -> list[dict[str, Any]]:
        """Episodes newest first (by when they fired)."""
        ts = time.time() if now is None else now
        query = select(AlertRow).order_by(AlertRow.fired_at.desc()).limit(limit)
        for column, value in ((AlertRow.severity, severity), (AlertRow.machine, machine), (AlertRow.line, line),
                              (AlertRow.rule, rule)):
            if value is not None:
                query = query.where(column == value)
        if since is not None:
            query = query.where(AlertRow.fired_at >= since)
        query = {None: query, "firing": query.where(AlertRow.resolved_at.is_(None)),
                 "resolved": query.where(AlertRow.resolved_at.is_not(None)),
                 "standing": query.where(AlertRow.acknowledged_at.is_(None)).where(_not_shelved(ts)),
                 "shelved": query.where(AlertRow.shelved_until > ts)}[state]
        with self.sessions() as session:
            return [alert_dict(row, ts) for row in session.scalars(query)]

    def alert(self, alert_id: str, now: float | None = None) -> dict[str, Any]:
        """One episode with its history (oldest first)."""
        ts = time.time() if now is None else now
        with self.sessions() as session:
            row = session.get(AlertRow, alert_id)
            if row is None:
                raise AlertError(404, f"no alert {alert_id!r}")
            history = session.scalars(select(AlertEventRow).where(AlertEventRow.alert_id == alert_id)
                                      .order_by(AlertEventRow.ts, AlertEventRow.id))
            return alert_dict(row, ts) | {"history": [event_dict(event) for event in history]}

    def kpis(self, now: float | None = None) -> dict[str, Any]:
        """Alarm rates and standing alarms (see the module docstring)."""
        ts = time.time() if now is None else now
        with self.sessions() as session:
            recent = session.execute(select(AlertRow.line, func.count()).where(AlertRow.fired_at >= ts - KPI_WINDOW_S)
                                     .group_by(AlertRow.line)).all()
            standing = session.execute(select(AlertRow.severity, func.count()).where(
                AlertRow.acknowledged_at.is_(None)).where(_not_shelved(ts)).group_by(AlertRow.severity)).all()
            actors = session.execute(select(AlertRow.rule, AlertRow.key, func.count().label("n")).where(
                AlertRow.fired_at >= ts - BAD_ACTORS_WINDOW_S).group_by(AlertRow.rule, AlertRow.key)
                .order_by(func.count().desc(), AlertRow.rule, AlertRow.key).limit(10)).all()
        per_line = {line or "": int(n) for line, n in recent}
        return {"window_s": KPI_WINDOW_S, "site_per_10_min": sum(per_line.values()), "per_line_per_10_min": per_line,
                "standing": {severity: int(n) for severity, n in standing},
                "bad_actors": [{"rule": rule, "key": key, "episodes": int(n)} for rule, key, n in actors],
                "eemua_per_10_min": EEMUA_ALARMS_PER_10_MIN}


def _not_shelved(now: float) -> Any:
    return (AlertRow.shelved_until.is_(None)) | (AlertRow.shelved_until <= now)


def alert_dict(row: AlertRow, now: float) -> dict[str, Any]:
    shelved = row.shelved_until is not None and row.shelved_until > now
    return {"id": row.id, "site": row.site, "rule": row.rule, "scope": row.scope, "key": row.key,
            "machine": row.machine, "camera": row.camera, "line": row.line, "severity": row.severity,
            "text": row.text, "value": row.value, "fired_at": row.fired_at, "resolved_at": row.resolved_at,
            "state": "resolved" if row.resolved_at is not None else "firing",
            "acknowledged_at": row.acknowledged_at, "acknowledged_by": row.acknowledged_by,
            "shelved_until": row.shelved_until if shelved else None,
            "standing": row.acknowledged_at is None and not shelved}


def event_dict(event: AlertEventRow) -> dict[str, Any]:
    return {"ts": event.ts, "kind": event.kind, "by": event.by, "note": event.note, "value": event.value,
            "until": event.until}


class AlertListener:
    """Alert messages from MQTT (``edgeline/v1/<site>/+/alert``: what the embedded rules runner
    publishes) into the store; one that does not parse, or whose topic names another machine or
    site, is dropped, logged and counted (``store.rejected``)."""

    def __init__(self, store: AlertStore, site: str) -> None:
        self.store = store
        self.topic = mqtt_topic(site, "+", "alert")

    def on_message(self, message: paho.MQTTMessage) -> None:
        try:
            alert = parse_message(message.payload)
            parts = parse_topic(message.topic)
        except (MessageError, ValueError) as exc:
            self._reject("invalid", message.topic, str(exc))
            return
        if not isinstance(alert, Alert) or (parts.site, parts.machine) != (alert.site, alert.machine):
            self._reject("identity", message.topic, f"a {alert.KIND} of {alert.site}/{alert.machine}")
            return
        self.store.record(alert)

    def _reject(self, reason: str, topic: str, why: str) -> None:
        self.store.rejected[reason] += 1
        log.warning("alerts: dropped a message on %s: %s", topic, why[:500])


class KafkaAlerts(Service):
    """The alerts of a site whose rules run on Kafka (``<prefix>.alerts``, what the workers
    produce) into the store: consumer group ``edgeline-central-<site>``, offsets committed only
    after a poll's records are stored, so a restarted central reads again at most what it had not
    committed (deduped on msg_id). Kafka away: the loop retries every second (the alerts wait in
    their topic). Needs the ``kafka`` extra (kafka-python)."""

    def __init__(self, store: AlertStore, site: str, bootstrap: str, topic: str,
                 supervisor: Supervisor | None = None) -> None:
        super().__init__(f"alerts-kafka:{site}", supervisor=supervisor)
        self.store, self.site, self.bootstrap, self.topic = store, site, bootstrap, topic
        self.add_loop("consume", self._consume_loop)

    def _consume_loop(self) -> None:
        from kafka import KafkaConsumer
        from kafka.errors import KafkaError

        consumer = KafkaConsumer(self.topic, bootstrap_servers=self.bootstrap, group_id=f"edgeline-central-{self.site}",
                                 client_id=f"edgeline-central-{self.site}-alerts", enable_auto_commit=False,
                                 auto_offset_reset="earliest")
        failing = False
        try:
            while not self.stopping.is_set():
                try:
                    batches = consumer.poll(timeout_ms=500)
                    for records in batches.values():
                        for record in records:
                            self._record(record.value)
                    if batches:
                        consumer.commit()
                    failing = False
                except KafkaError as exc:
                    if not failing:
                        log.warning("alerts: reading %s failed (%s); retrying", self.topic, exc)
                    failing = True
                    self.stopping.wait(1.0)
        finally:
            consumer.close()

    def _record(self, payload: bytes) -> None:
        try:
            alert = parse_message(payload)
        except MessageError as exc:
            self.store.rejected["invalid"] += 1
            log.warning("alerts: dropped a record of %s: %s", self.topic, exc.reason[:500])
            return
        if isinstance(alert, Alert) and alert.site == self.site:
            self.store.record(alert)
        elif not isinstance(alert, Alert):
            self.store.rejected["invalid"] += 1
