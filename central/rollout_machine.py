"""The staged rollout state machine: pure, no I/O and no clocks (``now`` is passed in).

A rollout takes one model package to an ordered list of target machines in stages (default:
1 machine, then 25%, then all). For each stage it asks for a deploy, waits until every machine of
the stage reports the new version loaded (or ``deploy_timeout_s`` passes), then soaks for
``soak_s`` while every health report is checked against the gates:

* ``loaded``: the machine runs the new version and says it loaded (a machine that reports the
  old version again, or a load failure, fails the gate);
* ``latency``: p95 inference latency within ``max_latency_ratio`` of the same machine's p95 on
  the old version (its last report before the deploy);
* ``errors``: error rate (frames whose inference failed) at most ``max_error_rate``;
* ``drift``: mean defect ratio within ``max_drift`` (absolute) of the machine's old-version mean,
  judged once both versions have at least ``drift_min_frames`` frames on that machine;
With ``min_shadow_agreement`` set, each stage first runs the candidate in shadow mode on its new
machines (``Shadow``): beside the old version, on a sample of live frames. Once every one of them
has compared ``shadow_frames`` frames with an agreement (mask IoU) of at least
``min_shadow_agreement``, the stage promotes the shadow (``Deploy(promote=True)``) and goes on as
above; a lower agreement, a shadow that fails to start, or ``shadow_timeout_s`` without enough
frames fails the ``shadow`` gate.

A failed gate rolls back every machine that received the new version (one ``Rollback`` action)
and stops the shadows not yet promoted (``StopShadow``); the rollout ends ``rolled_back`` once
every rolled-back machine reports the old version again. ``pause`` holds the rollout where it is
(no promotion and no new stage, gates are still checked), ``resume`` continues, ``abort`` rolls
back. Every transition is appended to ``history``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Literal

Phase = Literal["pending", "shadowing", "deploying", "soaking", "completed", "rolling_back", "rolled_back"]
ACTIVE: tuple[Phase, ...] = ("shadowing", "deploying", "soaking")

GATE_HELP = {
    "stages": "fractions of the machines, one per stage, e.g. 0,0.25,1 (0 = one machine: the canary)",
    "soak_s": "seconds each stage runs, its gates checked, before the next stage starts",
    "max_latency_ratio": "latency gate: largest p95 inference latency on the new package, as a multiple of the "
                         "same machine's p95 on the old one",
    "max_error_rate": "errors gate: largest share of frames whose inference failed (0-1)",
    "max_drift": "drift gate: largest shift of a machine's mean defect ratio from its old package's (absolute)",
    "drift_min_frames": "frames each package needs on a machine before drift is judged",
    "deploy_timeout_s": "longest wait, in seconds, for a stage's machines to report the new package loaded",
    "min_shadow_agreement": "shadow each stage first: promote only where the mask agreement (IoU) with the "
                            "running package is at least this (0-1)",
    "shadow_frames": "frames each machine compares in shadow mode before it is judged",
    "shadow_timeout_s": "longest wait, in seconds, for those shadow frames",
}
"""What each setting of a rollout means: the API's field descriptions and the CLI's help."""


class Operation(str, Enum):
    """What an operator can do to a running rollout."""

    pause = "pause"
    resume = "resume"
    abort = "abort"


@dataclass(frozen=True)
class Gates:
    max_latency_ratio: float = 1.2
    max_error_rate: float = 0.01
    max_drift: float = 0.05
    drift_min_frames: int = 20
    min_shadow_agreement: float | None = None
    shadow_frames: int = 50
    shadow_timeout_s: float = 300.0
    deploy_timeout_s: float = 120.0
    rollback_timeout_s: float = 60.0


@dataclass(frozen=True)
class Plan:
    """What to roll out where: ``stages`` are fractions of the targets, each rounded up, the
    first meaning one machine when it is 0 (the canary)."""

    package: str
    previous: str
    targets: tuple[str, ...]
    stages: tuple[float, ...] = (0.0, 0.25, 1.0)
    soak_s: float = 60.0
    gates: Gates = Gates()

    def stage_machines(self, index: int) -> tuple[str, ...]:
        """Every machine that runs the new version once stage ``index`` is deployed (cumulative)."""
        fraction = self.stages[index]
        count = 1 if fraction == 0 else math.ceil(fraction * len(self.targets))
        return self.targets[: max(1, min(len(self.targets), count))]


@dataclass(frozen=True)
class Health:
    """One machine's report, read from its heartbeats and results. ``shadow_*`` describe the
    rollout's candidate running in shadow mode on that machine (``None`` / 0 when it is not)."""

    machine: str
    version: str
    loaded: bool = True
    p95_latency_ms: float = 0.0
    error_rate: float = 0.0
    defect_ratio_mean: float = 0.0
    frames: int = 0
    """Frames the reported version has inferred on this machine since it was loaded."""
    shadow_agreement: float | None = None
    shadow_frames: int = 0


@dataclass(frozen=True)
class Shadow:
    machines: tuple[str, ...]
    package: str


@dataclass(frozen=True)
class Deploy:
    machines: tuple[str, ...]
    package: str
    promote: bool = False
    """Put the shadow already running on these machines in place, instead of loading afresh."""


@dataclass(frozen=True)
class StopShadow:
    machines: tuple[str, ...]


@dataclass(frozen=True)
class Rollback:
    machines: tuple[str, ...]
    to: str
    reason: str


Action = Shadow | Deploy | StopShadow | Rollback


@dataclass(frozen=True)
class Entry:
    ts: float
    phase: Phase
    stage: int
    """The stage's index, from 0 (``RolloutManager.describe`` shows stages from 1, as the texts do)."""
    text: str


@dataclass
class Rollout:
    plan: Plan
    phase: Phase = "pending"
    stage: int = -1
    paused: bool = False
    since: float = 0.0
    """When the current phase began (event time)."""
    failure: str | None = None
    shadowing: tuple[str, ...] = ()
    """This stage's new machines while they run the candidate in shadow mode (not yet deployed)."""
    history: list[Entry] = field(default_factory=list)
    _baseline: dict[str, Health] = field(default_factory=dict)
    _latest: dict[str, Health] = field(default_factory=dict)

    def latest_health(self) -> dict[str, Health]:
        """Each target machine's latest report: what the gates were last checked against."""
        return dict(self._latest)

    # ------------------------------------------------------------ inputs

    def start(self, now: float) -> list[Action]:
        if self.phase != "pending":
            raise RolloutError(f"cannot start a rollout that is {self.phase}")
        return self._deploy_stage(0, now)

    def report(self, now: float, health: Health) -> list[Action]:
        """A machine's health; may fail a gate, finish a deploy or a rollback."""
        if health.machine not in self.plan.targets:
            return []
        if health.version == self.plan.previous and health.machine not in self._deployed():
            self._baseline[health.machine] = health
        self._latest[health.machine] = health
        return self.tick(now)

    def tick(self, now: float) -> list[Action]:
        """Time passing: deploy and rollback timeouts, soak completion, next stage."""
        if self.phase == "shadowing":
            return self._check_shadowing(now)
        if self.phase == "deploying":
            return self._check_deploying(now)
        if self.phase == "soaking":
            return self._check_soaking(now)
        if self.phase == "rolling_back":
            self._check_rolled_back(now)
        return []

    def pause(self, now: float) -> None:
        self._require_active("pause")
        self.paused = True
        self._log(now, "paused")

    def resume(self, now: float) -> list[Action]:
        self._require_active("resume")
        self.paused = False
        self._log(now, "resumed")
        return self.tick(now)

    def abort(self, now: float, reason: str = "aborted by operator") -> list[Action]:
        self._require_active("abort")
        return self._roll_back(now, reason)

    # ------------------------------------------------------------ what it has done

    @property
    def done(self) -> bool:
        return self.phase in ("completed", "rolled_back")

    def _deployed(self) -> tuple[str, ...]:
        if self.stage < 0:
            return ()
        return tuple(m for m in self.plan.stage_machines(self.stage) if m not in self.shadowing)

    # ------------------------------------------------------------ transitions

    def _deploy_stage(self, index: int, now: float) -> list[Action]:
        before = set(self._deployed())
        self.stage = index
        self._enter("deploying", now)
        new = tuple(m for m in self._deployed() if m not in before)
        if self.plan.gates.min_shadow_agreement is not None:
            self.shadowing = new
            self._enter("shadowing", now)
            self._log(now, f"stage {index + 1}/{len(self.plan.stages)}: shadowing {self.plan.package} on "
                           f"{', '.join(new)}")
            return [Shadow(new, self.plan.package)]
        self._log(now, f"stage {index + 1}/{len(self.plan.stages)}: deploying {self.plan.package} to "
                       f"{', '.join(new)}")
        return [Deploy(new, self.plan.package)]

    def _check_shadowing(self, now: float) -> list[Action]:
        gates = self.plan.gates
        threshold = gates.min_shadow_agreement or 0.0
        counted = {m: h for m in self.shadowing if (h := self._latest.get(m)) is not None
                   and h.shadow_frames >= gates.shadow_frames and h.shadow_agreement is not None}
        failed = [m for m in self.shadowing if self._load_failed(m)]
        if failed:
            return self._roll_back(now, f"gate shadow: {', '.join(failed)} could not run {self.plan.package} "
                                        "in shadow mode")
        for machine, health in counted.items():
            agreement = health.shadow_agreement or 0.0
            if agreement < threshold:
                return self._roll_back(now, f"gate shadow: {machine} agreement {agreement:.3f} < {threshold:g} "
                                            f"over {health.shadow_frames} frames")
        waiting = [m for m in self.shadowing if m not in counted]
        if waiting and now - self.since > gates.shadow_timeout_s:
            return self._roll_back(now, f"gate shadow: {', '.join(waiting)} compared fewer than "
                                        f"{gates.shadow_frames} frames in {gates.shadow_timeout_s:g} s")
        if waiting or self.paused:
            return []
        promoted, self.shadowing = self.shadowing, ()
        self._enter("deploying", now)
        self._log(now, f"stage {self.stage + 1}: shadow agreement at least {threshold:g} on "
                       f"{', '.join(promoted)}; promoting")
        return [Deploy(promoted, self.plan.package, promote=True)]

    def _check_deploying(self, now: float) -> list[Action]:
        pending = [m for m in self._deployed() if not self._runs_new(m)]
        failed = [m for m in self._deployed() if self._load_failed(m)]
        if failed:
            return self._roll_back(now, f"gate loaded: {', '.join(failed)} failed to load {self.plan.package}")
        if pending and now - self.since > self.plan.gates.deploy_timeout_s:
            return self._roll_back(now, f"gate loaded: {', '.join(pending)} not on {self.plan.package} after "
                                        f"{self.plan.gates.deploy_timeout_s:g} s")
        if pending:
            return []
        self._enter("soaking", now)
        self._log(now, f"stage {self.stage + 1}: all {len(self._deployed())} machines on {self.plan.package}; soaking")
        return self._check_soaking(now)

    def _check_soaking(self, now: float) -> list[Action]:
        for machine in self._deployed():
            problem = self._gate_problem(machine)
            if problem:
                return self._roll_back(now, problem)
        if now - self.since < self.plan.soak_s or self.paused:
            return []
        if self.stage + 1 < len(self.plan.stages):
            return self._deploy_stage(self.stage + 1, now)
        self._enter("completed", now)
        self._log(now, f"{self.plan.package} on all {len(self.plan.targets)} machines")
        return []

    def _gate_problem(self, machine: str) -> str | None:
        health, gates = self._latest.get(machine), self.plan.gates
        if health is None:
            return None
        if health.version != self.plan.package or not health.loaded:
            return f"gate loaded: {machine} reports {health.version} (loaded={health.loaded})"
        base = self._baseline.get(machine)
        if base is not None and base.p95_latency_ms > 0:
            ratio = health.p95_latency_ms / base.p95_latency_ms
            if ratio > gates.max_latency_ratio:
                return (f"gate latency: {machine} p95 {health.p95_latency_ms:.1f} ms is {ratio:.2f}x the old "
                        f"{base.p95_latency_ms:.1f} ms (limit {gates.max_latency_ratio:g}x)")
        if health.error_rate > gates.max_error_rate:
            return f"gate errors: {machine} error rate {health.error_rate:.3f} > {gates.max_error_rate:g}"
        if (base is not None and min(health.frames, base.frames) >= gates.drift_min_frames
                and abs(health.defect_ratio_mean - base.defect_ratio_mean) > gates.max_drift):
            return (f"gate drift: {machine} mean defect ratio {health.defect_ratio_mean:.3g} vs "
                    f"{base.defect_ratio_mean:.3g} before (limit ±{gates.max_drift:g})")
        return None

    def _roll_back(self, now: float, reason: str) -> list[Action]:
        touched, shadows = self._deployed(), self.shadowing
        self.failure, self.shadowing = reason, ()
        self._enter("rolling_back", now)
        actions: list[Action] = []
        if shadows:
            self._log(now, f"stopping the shadow on {', '.join(shadows)}: {reason}")
            actions.append(StopShadow(shadows))
        if touched:
            self._log(now, f"rolling back {', '.join(touched)} to {self.plan.previous}: {reason}")
            actions.append(Rollback(touched, self.plan.previous, reason))
        self._check_rolled_back(now)
        return actions

    def _check_rolled_back(self, now: float) -> None:
        waiting = [m for m in self._deployed() if (h := self._latest.get(m)) is None or h.version != self.plan.previous]
        if not waiting:
            self._enter("rolled_back", now)
            self._log(now, f"all machines back on {self.plan.previous}")
        elif now - self.since > self.plan.gates.rollback_timeout_s:
            self._enter("rolled_back", now)
            self._log(now, f"rollback timed out; still not on {self.plan.previous}: {', '.join(waiting)}")

    # ------------------------------------------------------------ helpers

    def _runs_new(self, machine: str) -> bool:
        health = self._latest.get(machine)
        return health is not None and health.version == self.plan.package and health.loaded

    def _load_failed(self, machine: str) -> bool:
        health = self._latest.get(machine)
        return health is not None and health.version == self.plan.package and not health.loaded

    def _enter(self, phase: Phase, now: float) -> None:
        self.phase, self.since = phase, now

    def _log(self, now: float, text: str) -> None:
        self.history.append(Entry(now, self.phase, self.stage, text))

    def _require_active(self, verb: str) -> None:
        if self.phase not in ACTIVE:
            raise RolloutError(f"cannot {verb} a rollout that is {self.phase}")


def rollout_to_dict(rollout: Rollout) -> dict:
    """Everything a rollout knows, as JSON-ready data (central keeps it in its database)."""
    plan = rollout.plan
    return {
        "plan": {"package": plan.package, "previous": plan.previous, "targets": list(plan.targets),
                 "stages": list(plan.stages), "soak_s": plan.soak_s, "gates": asdict(plan.gates)},
        "phase": rollout.phase, "stage": rollout.stage, "paused": rollout.paused, "since": rollout.since,
        "failure": rollout.failure, "shadowing": list(rollout.shadowing), "history": [asdict(e) for e in rollout.history],
        "baseline": {m: asdict(h) for m, h in rollout._baseline.items()},
        "latest": {m: asdict(h) for m, h in rollout._latest.items()},
    }


def rollout_from_dict(data: dict) -> Rollout:
    plan = data["plan"]
    rollout = Rollout(Plan(plan["package"], plan["previous"], tuple(plan["targets"]), tuple(plan["stages"]),
                           plan["soak_s"], Gates(**plan["gates"])),
                      phase=data["phase"], stage=data["stage"], paused=data["paused"], since=data["since"],
                      failure=data["failure"], shadowing=tuple(data["shadowing"]), history=[Entry(**e) for e in data["history"]])
    rollout._baseline = {m: Health(**h) for m, h in data["baseline"].items()}
    rollout._latest = {m: Health(**h) for m, h in data["latest"].items()}
    return rollout


class RolloutError(RuntimeError):
    """An operation that the rollout's phase does not allow."""
