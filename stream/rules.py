"""The pure rules engine: messages in, decisions, alerts and commands out. No I/O, no clocks.

The embedded runner (MQTT, rule states in memory: :class:`BoundedStates`) and the Kafka
workers (rule states in tables changelogged to Kafka) both drive :class:`RulesEngine`, so
the same input sequence gives the same output list, message ids included.

How one message is handled:

1. Dedupe on ``msg_id`` (:class:`stream.dedupe.Deduper`, event time of the message, one dedupe
   clock per machine). A repeat produces nothing and counts in ``stats.duplicates``.
2. Results and anomalies become :class:`Observation` s (one per frame per model output, or one per
   anomaly); every other kind produces nothing.
3. Each observation goes to every rule whose metric it carries and whose ``match`` it passes, into
   the window of that rule's scope key (``m01/cam2``, ``m01`` or ``line:L1``).

Values: an anomaly level (score / threshold) and a rate are capped at ``VALUE_CAP`` in magnitude,
so every Decision carries a finite value. An observation whose time or a value is not finite, or
whose time is more than ``max_ahead_s`` ahead of the receiver's ``now`` (when the runner passes
one), is refused before any state changes and counted once in ``stats.refused``: no clock can be
pushed beyond the receiver's time plus that skew.

Event time, per (rule, scope key): the key's clock ``T`` is the newest event time it has seen and
never goes back. An observation older than ``T - allowed_lateness_s`` is dropped and counted once
in ``stats.late``. A younger one is inserted in event-time order (ties keep arrival order) and the
rule is re-evaluated *as of T*: a late observation can change a ``k_of_n`` count or a
``rate_of_change`` window, but never the newest observation a ``threshold`` rule looks at, and any
transition it causes is stamped ``T``. Decisions already emitted are never retracted.

Signal ("bad") and value, evaluated as of T:

* ``threshold``: the condition on the newest observation; value = its metric value.
* ``k_of_n``: among the last ``n`` observations with event time >= ``T - window_s``, at least ``k``
  meet the condition; value = how many of them do.
* ``rate_of_change``: (newest - oldest value) / (their time difference) over the observations with
  event time >= ``T - window_s``, compared with the condition; value = that rate per second. With
  fewer than two observations or no time between them the signal is unknown and the rule's state
  is left as it is.

Hysteresis, per (rule, scope key): a changed signal starts a pending run at T; the transition
happens at the first evaluation where the run has lasted ``hold_for_s`` (to fire) or
``clear_after_s`` (to resolve). Any evaluation back on the current state cancels the run. Each
transition emits, in this order: one Decision, one Alert (if the rule has an alert action), and one
Command per command action whose ``on`` is the new state and per target machine (sorted).
"""

from __future__ import annotations

import bisect
import logging
import math
import operator
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from stream.dedupe import Deduper
from stream.messages import DEFAULT_LIMITS, Alert, Anomaly, Command, Decision, Envelope, Result, stable_msg_id
from stream.rule_config import AlertAction, CommandAction, RuleConfig

log = logging.getLogger(__name__)

UNASSIGNED_LINE = "unassigned"
RATE_BUFFER_CAP = 1000
"""Most observations a rate_of_change window keeps; beyond it the oldest go (the rate then spans less)."""
VALUE_CAP = 1e12
"""Largest magnitude of a value the engine computes (an anomaly level, a rate): beyond it, capped."""
DEFAULT_MAX_STATES = 10_000
"""Rule states an in-memory engine keeps (rules x scope keys; a 50-machine site needs a few thousand)."""
MAX_ROUTES = 10_000
"""Observation sources (machine, line, model, camera, group) whose matching rules an engine keeps
worked out; beyond it the cache starts again."""

State = Literal["firing", "resolved"]

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


@dataclass(slots=True)
class Observation:
    """One value set at one event time: a model output of one frame, or one anomaly score.

    Treated as immutable, but not ``frozen``: a frozen dataclass's ``__init__`` sets each field
    through ``object.__setattr__``, 4-5x the cost, and the worker builds several per message."""

    site: str
    machine: str
    line: str
    model: str
    ts: float
    values: dict[str, float]
    camera: str | None = None
    group: str | None = None
    channels: tuple[str, ...] = ()
    """Anomalies: the channels that drove the alarm event (else the top channels now), largest first."""

    @property
    def source(self) -> str:
        """The camera, or the sensor group, which plays the camera's role for anomalies."""
        return self.camera if self.camera is not None else str(self.group)

    def to_dict(self) -> dict[str, object]:
        return {"site": self.site, "machine": self.machine, "line": self.line, "model": self.model, "ts": self.ts,
                "values": self.values, "camera": self.camera, "group": self.group, "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, data: dict) -> Observation:
        return cls(**(data | {"channels": tuple(data.get("channels", ()))}))


@dataclass
class EngineStats:
    messages: int = 0
    duplicates: int = 0
    late: int = 0
    refused: int = 0
    observations: int = 0
    decisions: int = 0
    alerts: int = 0
    commands: int = 0


def observations(message: Envelope, lines: dict[str, str] | None = None) -> list[Observation]:
    """The observations a message carries: per frame per model output, or one per anomaly."""
    line = (lines or {}).get(message.machine, UNASSIGNED_LINE)
    if isinstance(message, Result):
        return [
            Observation(
                site=message.site, machine=message.machine, line=line, model=out.model, ts=frame.ts,
                camera=message.camera,
                values={
                    "defect_ratio": out.defect_ratio,
                    "defect_count": float(len(out.regions)),
                    "max_score": max((r.score for r in out.regions), default=0.0),
                    "latency_ms": out.latency_ms,
                    "alarm": float(out.alarm),
                },
            )
            for frame in message.frames
            for out in frame.outputs
        ]
    if isinstance(message, Anomaly):
        return [
            Observation(
                site=message.site, machine=message.machine, line=line, model=message.model, ts=message.ts,
                group=message.group,
                values={"anomaly_score": message.score, "anomaly_level": capped(message.score / message.threshold)},
                channels=tuple(message.alarm.channels if message.alarm and message.alarm.channels
                               else message.top_channels),
            )
        ]
    return []


def capped(value: float) -> float:
    """``value`` limited to ``[-VALUE_CAP, VALUE_CAP]`` (an overflow to inf included)."""
    return max(-VALUE_CAP, min(VALUE_CAP, value))


def matches_source(rule: RuleConfig, obs: Observation) -> bool:
    """Whether the rule sees observations from where ``obs`` comes from (the rule also needs its
    metric among the values); a filter on a field the observation lacks is ignored."""
    m = rule.match
    return (
        (not m.machines or obs.machine in m.machines)
        and (not m.lines or obs.line in m.lines)
        and (not m.models or obs.model in m.models)
        and (not m.cameras or obs.camera is None or obs.camera in m.cameras)
        and (not m.groups or obs.group is None or obs.group in m.groups)
    )


def scope_key(rule: RuleConfig, obs: Observation) -> str:
    if rule.scope == "camera":
        return f"{obs.machine}/{obs.source}"
    if rule.scope == "machine":
        return obs.machine
    return f"line:{obs.line}"


@dataclass
class RuleState:
    """What one (rule, scope key) remembers: its window of (event time, value) points in
    event-time order, its clock, and its hysteresis. Plain data, so that a worker's table (or any
    mapping) can hold it; see :meth:`to_dict`."""

    points: list[tuple[float, float]] = field(default_factory=list)
    clock: float = float("-inf")
    firing: bool = False
    pending_since: float | None = None
    bad: int | None = field(default=None, compare=False, repr=False)
    """k_of_n: how many of ``points`` meet the rule's condition, kept by :func:`add_point` so that
    an evaluation does not count the window again (None: not counted yet; never stored)."""

    def to_dict(self) -> dict[str, object]:
        return {"points": [list(p) for p in self.points], "clock": None if self.clock == float("-inf") else self.clock,
                "firing": self.firing, "pending_since": self.pending_since}

    @classmethod
    def from_dict(cls, data: dict) -> RuleState:
        clock = data.get("clock")
        return cls([(float(t), float(v)) for t, v in data.get("points", [])],
                   float("-inf") if clock is None else float(clock), bool(data.get("firing")), data.get("pending_since"))


def add_point(state: RuleState, rule: RuleConfig, allowed_lateness_s: float, ts: float, value: float) -> bool:
    """Insert in event-time order and trim to the rule's window as of the key's clock: its span
    and cap (what :func:`evaluate` reads); False (and nothing stored) when older than the watermark."""
    if ts < state.clock - allowed_lateness_s:
        return False
    points = state.points
    kind = rule.kind
    counting = kind == "k_of_n"
    if counting:
        cond, limit = _OPS[rule.condition.op], rule.condition.value
        bad = (_count_bad(rule, points) if state.bad is None else state.bad) + cond(value, limit)
    if ts >= state.clock:  # in order, the common case: it goes last
        state.clock = ts
        points.append((ts, value))
    else:
        bisect.insort_right(points, (ts, value), key=_time)
    horizon = state.clock - (0.0 if kind == "threshold" else rule.window_s)
    cap = 1 if kind == "threshold" else rule.n if counting else RATE_BUFFER_CAP
    cut = len(points) - cap if len(points) > cap else 0
    if points[cut][0] < horizon:
        cut = bisect.bisect_left(points, horizon, key=_time)
    if cut:
        if counting:
            bad -= cond(points[0][1], limit) if cut == 1 else _count_bad(rule, points[:cut])
        del points[:cut]
    if counting:
        state.bad = bad
    return True


def evaluate(rule: RuleConfig, state: RuleState) -> tuple[bool | None, float]:
    """The rule's signal (None: unknown) and value as of the key's clock, over the window
    :func:`add_point` left in ``state``."""
    cond = _OPS[rule.condition.op]
    limit = rule.condition.value
    points = state.points
    if rule.kind == "threshold":
        value = points[-1][1]
        return cond(value, limit), value
    if rule.kind == "k_of_n":
        bad = _count_bad(rule, points) if state.bad is None else state.bad
        return bad >= rule.k, float(bad)
    (t0, v0), (t1, v1) = points[0], points[-1]
    if t1 <= t0:
        return None, 0.0
    rate = capped((v1 - v0) / (t1 - t0))
    return cond(rate, limit), rate


def _count_bad(rule: RuleConfig, points: list[tuple[float, float]]) -> int:
    cond, limit = _OPS[rule.condition.op], rule.condition.value
    return sum([cond(v, limit) for _, v in points])


def _time(point: tuple[float, float]) -> float:
    return point[0]


def hysteresis(state: RuleState, rule: RuleConfig, now: float, bad: bool | None) -> State | None:
    """Feed the signal at event time ``now`` (never decreasing); the transition it causes, if any."""
    if bad is None:
        return None
    if bad == state.firing:
        state.pending_since = None
        return None
    if state.pending_since is None:
        state.pending_since = now
    if now - state.pending_since < (rule.clear_after_s if state.firing else rule.hold_for_s):
        return None
    state.firing, state.pending_since = bad, None
    return "firing" if bad else "resolved"


@dataclass(frozen=True, slots=True)
class _Transition:
    rule: RuleConfig
    obs: Observation
    key: str
    state: State
    ts: float
    value: float


class _Route(NamedTuple):
    """A rule that sees a source's observations, with that source's scope key and state key."""

    rule: RuleConfig
    key: str
    state_key: str


class BoundedStates(MutableMapping[str, RuleState]):
    """In-memory rule states, at most ``max_entries``: beyond that the least recently updated goes
    (counted in ``evicted``; its key starts afresh if it comes back)."""

    def __init__(self, max_entries: int = DEFAULT_MAX_STATES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self.evicted = 0
        self._states: OrderedDict[str, RuleState] = OrderedDict()

    def __getitem__(self, key: str) -> RuleState:
        return self._states[key]

    def __setitem__(self, key: str, state: RuleState) -> None:
        self._states[key] = state
        self._states.move_to_end(key)
        while len(self._states) > self.max_entries:
            evicted, _ = self._states.popitem(last=False)
            self.evicted += 1
            log.warning("rules: %d rule states held, the bound: forgot the least recently updated, %s",
                        self.max_entries, evicted)

    def __delitem__(self, key: str) -> None:
        del self._states[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._states)

    def __len__(self) -> int:
        return len(self._states)


class RulesEngine:
    """Feeds messages through the rules; see the module docstring for the exact semantics.

    ``scopes`` limits the engine to the rules of those scopes (the Kafka worker runs camera and
    machine rules where messages are partitioned by machine, and line rules after repartitioning
    by line). ``states`` (rule state by ``"<rule>|<scope key>"``) defaults to an in-memory store
    bounded by ``max_states``; the Kafka worker passes each batch's table-backed states (and
    dedupes in its own tables, :mod:`stream.batches`). The in-memory dedupe (:meth:`accept`) keeps
    at most ``dedupe_max_entries`` ids, one clock per machine. ``max_ahead_s``: how far ahead of
    the ``now`` a runner passes an observation's time may be.
    """

    def __init__(
        self,
        rules: list[RuleConfig],
        lines: dict[str, str] | None = None,
        allowed_lateness_s: float = 2.0,
        dedupe_ttl_s: float = 60.0,
        dedupe_max_entries: int = 100_000,
        *,
        max_states: int = DEFAULT_MAX_STATES,
        max_ahead_s: float = DEFAULT_LIMITS.max_ahead_s,
        scopes: Collection[str] = ("camera", "machine", "line"),
        states: MutableMapping[str, RuleState] | None = None,
    ) -> None:
        self._rules = [rule for rule in rules if rule.scope in scopes]
        self._lines = dict(lines or {})
        self._line_machines: dict[str, list[str]] = {}
        for machine, line in sorted(self._lines.items()):
            self._line_machines.setdefault(line, []).append(machine)
        self._lateness = allowed_lateness_s
        self._max_ahead_s = max_ahead_s
        self.deduper = Deduper(dedupe_ttl_s, dedupe_max_entries)
        self.states: MutableMapping[str, RuleState] = states if states is not None else BoundedStates(max_states)
        self.stats = EngineStats()
        self._routes: dict[tuple[str, str, str, str | None, str | None], list[_Route]] = {}

    @property
    def lines(self) -> dict[str, str]:
        return self._lines

    @property
    def metrics(self) -> list[str]:
        """The metrics this engine's rules read, sorted."""
        return sorted({rule.metric for rule in self._rules})

    def process(self, message: Envelope, now: float | None = None) -> list[Envelope]:
        """Feed one parsed message received at ``now`` (the receiver's clock; None: not checked);
        return the Decision, Alert and Command messages it caused, in a deterministic order."""
        if not self.accept(message):
            return []
        return self.observe_all(observations(message, self._lines), now)

    def accept(self, message: Envelope) -> bool:
        """Count the message; False for a repeat of one already seen (dedupe on ``msg_id``)."""
        self.stats.messages += 1
        return self.first_time(message.msg_id, message.ts, message.machine)

    def first_time(self, msg_id: str, ts: float, machine: str = "") -> bool:
        """Record an id of ``machine`` at event time ``ts``; False (and counted) when it is a repeat."""
        if self.deduper.seen(msg_id, ts, machine):
            self.stats.duplicates += 1
            return False
        return True

    def wants(self, obs: Observation) -> bool:
        """Whether any of this engine's rules sees the observation."""
        return any(route.rule.metric in obs.values for route in self._routes_of(obs))

    def observe(self, obs: Observation) -> list[Envelope]:
        """Feed one observation; the messages its transitions emit."""
        return self.observe_all([obs])

    def observe_all(self, batch: list[Observation], now: float | None = None,
                    fresh: Callable[[str, Observation], bool] | None = None) -> list[Envelope]:
        """Feed observations in order, received at ``now`` (None: not checked against a clock);
        each rule state they touch is read from ``states`` once and written back once at the end
        (a table-backed store then serialises a state once per batch, not once per frame).

        ``fresh(state_key, obs)``, asked before a state is read, lets a runner that replays its
        input after a crash say that a state already took an observation (False): the engine then
        leaves that state alone for it, so no state takes the same input twice."""
        touched: dict[str, RuleState] = {}
        out: list[Envelope] = []
        try:
            for obs in batch:
                self.stats.observations += 1
                if not self._admissible(obs, now):
                    continue
                for transition in self._observe(obs, touched, fresh):
                    out.extend(self._emit(transition))
        finally:
            for key, state in touched.items():
                self.states[key] = state
        return out

    def buffered(self) -> int:
        """Observations held in all windows (bounded by rules x keys x per-kind caps)."""
        return sum(len(s.points) for s in self.states.values())

    def _admissible(self, obs: Observation, now: float | None) -> bool:
        """False (and counted) for a time or value that is not finite, or a time too far ahead."""
        finite = math.isfinite(obs.ts) and all(map(math.isfinite, obs.values.values()))
        if finite and (now is None or obs.ts <= now + self._max_ahead_s):
            return True
        self.stats.refused += 1
        log.warning("rules: refused an observation of %s/%s at ts=%r (receiver's clock %r): a time or value "
                    "not finite, or more than %g s ahead", obs.machine, obs.source, obs.ts, now, self._max_ahead_s)
        return False

    def _observe(self, obs: Observation, touched: dict[str, RuleState],
                 fresh: Callable[[str, Observation], bool] | None) -> list[_Transition]:
        transitions: list[_Transition] = []
        late = False
        values = obs.values
        for rule, key, state_key in self._routes_of(obs):
            if rule.metric not in values:
                continue
            if fresh is not None and not fresh(state_key, obs):
                continue
            state = touched.get(state_key) or self.states.get(state_key) or RuleState()
            if not add_point(state, rule, self._lateness, obs.ts, values[rule.metric]):
                late = True
                continue
            touched[state_key] = state
            bad, value = evaluate(rule, state)
            new_state = hysteresis(state, rule, state.clock, bad)
            if new_state is not None:
                transitions.append(_Transition(rule, obs, key, new_state, state.clock, value))
        if late:
            self.stats.late += 1
            log.debug("late observation dropped: %s/%s ts=%s", obs.machine, obs.source, obs.ts)
        return transitions

    def _routes_of(self, obs: Observation) -> list[_Route]:
        """The rules that see observations from ``obs``'s source (metric aside), with their scope
        and state keys, worked out once per source."""
        source = (obs.machine, obs.line, obs.model, obs.camera, obs.group)
        routes = self._routes.get(source)
        if routes is None:
            if len(self._routes) >= MAX_ROUTES:
                self._routes.clear()
            routes = self._routes[source] = [
                _Route(rule, key, f"{rule.name}|{key}")
                for rule in self._rules if matches_source(rule, obs)
                for key in (scope_key(rule, obs),)
            ]
        return routes

    def _emit(self, t: _Transition) -> list[Envelope]:
        rule, obs = t.rule, t.obs
        commands = [a for a in rule.actions if isinstance(a, CommandAction) and a.on == t.state]
        alerting = any(isinstance(a, AlertAction) for a in rule.actions)
        ids = (rule.name, t.key, t.state, t.ts)
        camera = obs.camera if rule.scope == "camera" else None
        summary = _summary(t)
        out: list[Envelope] = [
            Decision(
                msg_id=stable_msg_id(*ids, "decision"), site=obs.site, machine=obs.machine, ts=t.ts,
                rule=rule.name, state=t.state, scope=rule.scope, key=t.key, value=t.value,
                actions=(["alert"] if alerting else []) + [f"command:{a.name}" for a in commands],
            )
        ]
        if alerting:
            text = f"{rule.description}: {summary}" if rule.description else summary
            out.append(
                Alert(
                    msg_id=stable_msg_id(*ids, "alert"), site=obs.site, machine=obs.machine, ts=t.ts,
                    rule=rule.name, state=t.state, severity=rule.severity, scope=rule.scope, key=t.key,
                    value=t.value, text=text[:2000], camera=camera,
                    line=obs.line if rule.scope == "line" else None,
                )
            )
        sent = [
            Command(
                msg_id=stable_msg_id(*ids, "command", index, action.name, target), site=obs.site,
                machine=target, ts=t.ts, name=action.name, camera=camera, args=dict(action.args),
                reason=f"{rule.name} {summary}"[:500],
            )
            for index, action in enumerate(commands)
            for target in self._targets(rule, obs)
        ]
        self.stats.decisions += 1
        self.stats.alerts += int(alerting)
        self.stats.commands += len(sent)
        return out + sent

    def _targets(self, rule: RuleConfig, obs: Observation) -> list[str]:
        """Machines a command goes to: the observed one, or every known machine of its line."""
        if rule.scope != "line":
            return [obs.machine]
        return sorted({*self._line_machines.get(obs.line, []), obs.machine})


def _summary(t: _Transition) -> str:
    """A short human summary, e.g. ``firing: defect_ratio 0.12 >= 0.05 on m01/cam2``."""
    rule = t.rule
    cond = f"{rule.condition.op} {rule.condition.value:g}"
    if rule.kind == "k_of_n":
        what = f"{t.value:g} of last {rule.n} {rule.metric} {cond} within {rule.window_s:g}s"
    elif rule.kind == "rate_of_change":
        what = f"{rule.metric} changing {t.value:+g}/s (limit {cond}/s)"
    else:
        what = f"{rule.metric} {t.value:g} (limit {cond})"
    channels = f" (top channels: {', '.join(t.obs.channels)})" if t.obs.channels else ""
    return f"{t.state}: {what} on {t.key}{channels}"
