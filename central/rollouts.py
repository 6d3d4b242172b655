"""Rollouts wired to the fleet: the pure :class:`central.rollout_machine.Rollout` fed by the machines'
heartbeats and events over MQTT, its actions sent as edge commands. The same heartbeats and the
machines' retained status keep the fleet registry's status, last heartbeat and models current.

``Deploy`` becomes ``load_model`` {model, url, sha256} (the edge downloads the package from this
service by a short-lived signed link, :class:`central.tokens.DownloadLinks`, so it needs no
credential of its own; it verifies the package and swaps it in), or ``promote_shadow`` {model}
when the candidate already runs there in shadow mode; ``Shadow`` becomes ``shadow_model`` {model, url, sha256, every};
``StopShadow`` becomes ``stop_shadow``; ``Rollback`` becomes ``rollback_model`` {model}. Health is
read from heartbeats (the package each machine runs, p95 inference latency of its cameras, the
model's failed frames and mean defect ratio since its package was loaded, the shadow's agreement
and frame count) and from ``model_load_failed`` / ``shadow_failed`` events. The manager is a
:class:`stream.service.Service` (``rollouts:<site>``) whose supervised loop ``tick`` (thread
``rollouts:<site>/tick``, restarts counted in ``edgeline_central_restarts_total``) drives soak
times and timeouts.

A message's machine is the one in its topic, which the broker's ACL binds to the machine's login:
a payload naming another machine or site, one that fails validation, and a heartbeat from a
machine that neither the site file nor the registry knows (unless ``register_unknown``) are
dropped, logged and counted by reason (``edgeline_central_messages_rejected_total``).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict

import paho.mqtt.client as paho

from central.fleet import FleetStatus
from central.registry import Registry, RegistryError
from central.rollout_machine import (Action, Deploy, Gates, Health, Plan, Rollback, Rollout, Shadow, StopShadow,
                             rollout_from_dict, rollout_to_dict)
from central.tokens import DownloadLinks
from stream.messages import Command, Event, Heartbeat, MessageError, ModelHealth, parse_message
from stream.mqtt import MqttClient
from stream.service import Service, Supervisor
from stream.topics import mqtt_topic, parse_topic, topic_for

log = logging.getLogger(__name__)

FAILURE_EVENTS = ("model_load_failed", "shadow_failed")
SHADOW_EVERY = 2
"""A shadow runs the candidate on one batch in this many: enough frames for the gate in seconds,
at half the candidate's cost."""
WARNED_TOPICS_MAX = 1000
"""Dropped messages are logged at warning once per (topic, reason), for this many pairs at most."""


class RolloutManager(Service):
    def __init__(self, site: str, registry: Registry, mqtt: MqttClient, public_url: str, tick_s: float = 0.5,
                 *, links: DownloadLinks | None = None, register_unknown: bool = False,
                 supervisor: Supervisor | None = None, fleet: FleetStatus | None = None) -> None:
        super().__init__(f"rollouts:{site}", supervisor=supervisor or Supervisor("central"))
        self.site = site
        self.fleet = fleet
        """Where each accepted heartbeat also goes (the console's fleet view), if anywhere."""
        self.links = links
        """Signs the download URLs of load_model/shadow_model (None: unsigned URLs, only for tests that
        never download)."""
        self.register_unknown = register_unknown
        """Register a machine on its first heartbeat when neither the site file nor the registry has it."""
        self.rejected: Counter[str] = Counter()
        """reason -> messages from the machines that were dropped (identity, invalid, unknown_machine)."""
        self._warned: set[tuple[str, str]] = set()
        self.registry = registry
        self.mqtt = mqtt
        self.public_url = public_url.rstrip("/")
        self.tick_s = tick_s
        self.rollouts: dict[str, Rollout] = {}
        self.models: dict[str, str] = {}
        """rollout id -> the model name (site config key) it replaces."""
        self.running: dict[str, dict[str, str]] = {}
        """machine -> {model name: package id}, from the latest heartbeat."""
        self.model_health: dict[str, dict[str, ModelHealth]] = {}
        """machine -> {model name: its health since its package was loaded}, from the latest heartbeat."""
        self.shadow: dict[tuple[str, str], tuple[float, int]] = {}
        """(machine, package) -> the last shadow-mode (agreement, frames) that machine reported."""
        self._latency: dict[str, float] = {}
        """machine -> p95 inference latency (the worst of its cameras), from the latest heartbeat."""
        self._saved: dict[str, tuple[int, str, bool]] = {}
        """What was last written per rollout: (history length, phase, paused)."""
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        """Held from a rollout's snapshot to its write: the API's create and the tick loop save the
        same new rollout at once (two INSERTs of one id), and a later state must never be
        overwritten by an earlier one."""
        self.add_loop("tick", self._tick_loop)

    def restore(self) -> None:
        """Load every rollout from the database; unfinished ones go on from where they were."""
        for rollout_id, model, state in self.registry.rollouts():
            self.rollouts[rollout_id], self.models[rollout_id] = rollout_from_dict(state), model

    def on_start(self) -> None:
        self.restore()
        self.mqtt.subscribe(mqtt_topic(self.site, "+", "heartbeat"), self._on_message)
        self.mqtt.subscribe(mqtt_topic(self.site, "+", "event"), self._on_message)
        self.mqtt.subscribe(mqtt_topic(self.site, "+", "status"), self._on_status)
        self.mqtt.start()

    def on_stop(self) -> None:
        self.mqtt.stop()

    # ------------------------------------------------------------ operations

    def create(self, package_id: str, model: str, machines: list[str], *, stages: tuple[float, ...] = (0.0, 0.25, 1.0),
               soak_s: float = 60.0, gates: Gates | None = None) -> str:
        """Start a rollout; RegistryError 404 for an unknown package or machine, ValueError when the
        machines do not all report one running package for ``model``."""
        self.registry.package(package_id)  # 404 for an unknown package
        known = {row.id for row in self.registry.machines()}
        with self._lock:
            self._check_targets(model, machines, known | set(self.running))
            rollout_id = uuid.uuid4().hex[:12]
            previous = self.running[machines[0]][model]
            rollout = Rollout(Plan(package_id, previous, tuple(machines), stages, soak_s, gates or Gates()))
            self.rollouts[rollout_id], self.models[rollout_id] = rollout, model
            now = time.time()
            for machine in machines:
                rollout.report(now, self._health(machine, model, package_id))
            actions = rollout.start(now)
        self._execute(rollout_id, actions)
        return rollout_id

    def _check_targets(self, model: str, machines: list[str], known: set[str]) -> None:
        unknown = [m for m in machines if m not in known]
        if unknown:
            raise RegistryError(404, f"no machine {', '.join(unknown)} in the fleet; known machines: "
                                     f"{', '.join(sorted(known)) or 'none'}")
        silent = [m for m in machines if model not in self.running.get(m, {})]
        if silent:
            raise ValueError(f"{', '.join(silent)} reported no running package for {model!r} since central started: "
                             "wait for their heartbeats (is the edge agent running?)")
        running = {m: self.running[m][model] for m in machines}
        if len(set(running.values())) > 1:
            raise ValueError(f"the machines run different packages for {model!r} "
                             f"({', '.join(f'{m}={p}' for m, p in running.items())}): roll out to the machines of "
                             "one package at a time")

    def pause(self, rollout_id: str) -> None:
        with self._lock:
            self._get(rollout_id).pause(time.time())
        self._save(rollout_id)

    def resume(self, rollout_id: str) -> None:
        with self._lock:
            actions = self._get(rollout_id).resume(time.time())
        self._execute(rollout_id, actions)

    def abort(self, rollout_id: str) -> None:
        with self._lock:
            actions = self._get(rollout_id).abort(time.time())
        self._execute(rollout_id, actions)

    def describe(self, rollout_id: str) -> dict:
        """A rollout as the API shows it. Stages are counted from 1, at the top and in the history
        (0: not started); times are UTC epoch seconds."""
        with self._lock:
            rollout = self._get(rollout_id)
            return {"id": rollout_id, "package": rollout.plan.package, "previous": rollout.plan.previous,
                    "model": self.models[rollout_id], "phase": rollout.phase, "stage": rollout.stage + 1,
                    "stages": len(rollout.plan.stages), "paused": rollout.paused, "failure": rollout.failure,
                    "machines": list(rollout.plan.targets), "gates": asdict(rollout.plan.gates),
                    "history": [asdict(e) | {"stage": e.stage + 1} for e in rollout.history]}

    def gate_values(self, rollout_id: str) -> dict[str, dict]:
        """Each target machine's latest report, which the gates were last checked against."""
        with self._lock:
            return {machine: asdict(health) for machine, health in self._get(rollout_id).latest_health().items()}

    def _get(self, rollout_id: str) -> Rollout:
        if rollout_id not in self.rollouts:
            raise KeyError(rollout_id)
        return self.rollouts[rollout_id]

    # ------------------------------------------------------------ inputs

    def _on_status(self, message: paho.MQTTMessage) -> None:
        """The machines' retained online/offline (their last-will), into the fleet registry."""
        state = message.payload.decode("utf-8", errors="replace").strip()
        if state in ("online", "offline"):
            self.registry.set_status(message.topic.split("/")[3], state)

    def _on_message(self, message: paho.MQTTMessage) -> None:
        try:
            parsed = parse_message(message.payload)
        except MessageError as exc:
            self._reject(message.topic, "invalid", str(exc))
            return
        if (parsed.site, parsed.machine) != (self.site, parse_topic(message.topic).machine):
            self._reject(message.topic, "identity", f"the payload claims to come from {parsed.site}/{parsed.machine}")
            return
        now = time.time()
        if isinstance(parsed, Heartbeat):
            if not self.registry.record_heartbeat(parsed.machine, parsed.site, parsed.ts, dict(parsed.models),
                                                  [camera.camera for camera in parsed.cameras],
                                                  register_unknown=self.register_unknown):
                self._reject(message.topic, "unknown_machine", f"{parsed.machine} is in neither the site file nor "
                             "the registry (central serve --register-unknown-machines admits it)")
                return
            if self.fleet is not None:
                self.fleet.on_heartbeat(parsed)
            with self._lock:
                self.running[parsed.machine] = dict(parsed.models)
                self.model_health[parsed.machine] = dict(parsed.health)
                self._latency[parsed.machine] = max((c.latency_p95_ms for c in parsed.cameras), default=0.0)
                for shadow in parsed.shadow.values():
                    self.shadow[(parsed.machine, shadow.package)] = (shadow.agreement, shadow.frames)
            self._feed(now, parsed.machine, loaded=True)
        elif isinstance(parsed, Event) and parsed.name in FAILURE_EVENTS:
            self._feed(now, parsed.machine, loaded=False)

    def _reject(self, topic: str, reason: str, text: str) -> None:
        """Drop a machine's message: counted by reason, logged at warning the first time per topic and reason."""
        self.rejected[reason] += 1
        first = (topic, reason) not in self._warned and len(self._warned) < WARNED_TOPICS_MAX
        if first:
            self._warned.add((topic, reason))
        level = logging.WARNING if first else logging.DEBUG
        log.log(level, "rollouts: dropped a message on %s (%s): %s; %d dropped for this reason so far",
                topic, reason, text, self.rejected[reason])

    def _health(self, machine: str, model: str, candidate: str, loaded: bool = True) -> Health:
        """What ``machine`` reports for ``model``; a failure is reported against ``candidate``."""
        version = self.running.get(machine, {}).get(model, "") if loaded else candidate
        agreement, shadow_frames = self.shadow.get((machine, candidate), (None, 0))
        results = self.model_health.get(machine, {}).get(model)
        if results is None or results.package != version:
            results = ModelHealth(package=version)
        return Health(machine, version, loaded=loaded, p95_latency_ms=self._latency.get(machine, 0.0),
                      error_rate=results.errors / max(1, results.frames + results.errors),
                      defect_ratio_mean=results.defect_ratio_mean, frames=results.frames,
                      shadow_agreement=agreement, shadow_frames=shadow_frames)

    def _feed(self, now: float, machine: str, loaded: bool) -> None:
        for rollout_id, rollout in list(self.rollouts.items()):
            if rollout.done or machine not in rollout.plan.targets:
                continue
            with self._lock:
                model = self.models[rollout_id]
                health = self._health(machine, model, rollout.plan.package, loaded)
                actions = rollout.report(now, health)
            self._execute(rollout_id, actions)

    def _tick_loop(self) -> None:
        while not self.stopping.wait(self.tick_s):
            for rollout_id, rollout in list(self.rollouts.items()):
                if not rollout.done:
                    with self._lock:
                        actions = rollout.tick(time.time())
                    self._execute(rollout_id, actions)

    # ------------------------------------------------------------ outputs

    def _save(self, rollout_id: str) -> None:
        """Write the rollout when something it records changed (not on every heartbeat)."""
        with self._save_lock:
            with self._lock:
                rollout = self.rollouts[rollout_id]
                version = (len(rollout.history), rollout.phase, rollout.paused)
                if self._saved.get(rollout_id) == version:
                    return
                state = rollout_to_dict(rollout)
            self.registry.save_rollout(rollout_id, self.models[rollout_id], state)
            self._saved[rollout_id] = version

    def _execute(self, rollout_id: str, actions: list[Action]) -> None:
        self._save(rollout_id)
        model = self.models[rollout_id]
        for action in actions:
            if isinstance(action, Deploy) and action.promote:
                self._command(action.machines, "promote_shadow", {"model": model}, f"rollout {rollout_id}")
            elif isinstance(action, Deploy):
                self._command(action.machines, "load_model", self._fetch_args(model, action.package),
                              f"rollout {rollout_id}")
            elif isinstance(action, Shadow):
                self._command(action.machines, "shadow_model",
                              {**self._fetch_args(model, action.package), "every": SHADOW_EVERY},
                              f"rollout {rollout_id}")
            elif isinstance(action, StopShadow):
                self._command(action.machines, "stop_shadow", {"model": model}, f"rollout {rollout_id}")
            elif isinstance(action, Rollback):
                self._command(action.machines, "rollback_model", {"model": model},
                              f"rollout {rollout_id}: {action.reason}")

    def _fetch_args(self, model: str, package_id: str) -> dict[str, str]:
        stored = self.registry.package(package_id)
        url = f"{self.public_url}/models/{stored.id}/download"
        if self.links is not None:
            url += "?" + self.links.query(stored.id, time.time())
        return {"model": model, "url": url, "sha256": stored.sha256}

    def _command(self, machines: tuple[str, ...], name: str, args: dict, reason: str) -> None:
        for machine in machines:
            command = Command(site=self.site, machine=machine, ts=time.time(), name=name, args=args,
                              reason=reason[:500])
            self.mqtt.publish(topic_for(command), command.to_json(), qos=1)
            log.info("rollouts: %s -> %s (%s)", name, machine, reason)
