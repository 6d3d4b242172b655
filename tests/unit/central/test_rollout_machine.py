"""The rollout state machine on scripted timelines of health reports."""

from __future__ import annotations

import json

import pytest

from central.rollout_machine import (Deploy, Gates, Health, Plan, Rollback, Rollout, RolloutError, Shadow, StopShadow,
                             rollout_from_dict, rollout_to_dict)

OLD, NEW = "seg:1.0.0", "seg:1.1.0"
MACHINES = tuple(f"m{i:02d}" for i in range(1, 9))


def plan(**kw) -> Plan:
    return Plan(package=NEW, previous=OLD, targets=MACHINES, soak_s=30.0, **kw)


def healthy(machine: str, version: str, p95: float = 10.0, ratio: float = 0.02, frames: int = 100, **kw) -> Health:
    return Health(machine, version, p95_latency_ms=p95, defect_ratio_mean=ratio, frames=frames, **kw)


def baseline(rollout: Rollout, now: float = 0.0) -> None:
    for m in MACHINES:
        rollout.report(now, healthy(m, OLD))


def swap(rollout: Rollout, machines, now: float, **kw) -> list:
    actions = []
    for m in machines:
        actions += rollout.report(now, healthy(m, NEW, **kw))
    return actions


def test_stages_canary_then_quarter_then_all():
    assert [len(plan().stage_machines(i)) for i in range(3)] == [1, 2, 8]
    rollout = Rollout(plan())
    baseline(rollout)
    assert rollout.start(1.0) == [Deploy(("m01",), NEW)]
    assert swap(rollout, ["m01"], 5.0) == [] and rollout.phase == "soaking"
    assert rollout.tick(34.0) == []  # soaking 29 s of 30
    assert rollout.tick(35.0) == [Deploy(("m02",), NEW)]  # 25% of 8 = 2 machines in all
    assert swap(rollout, ["m02"], 40.0) == []
    assert rollout.tick(70.0) == [Deploy(MACHINES[2:], NEW)]
    swap(rollout, MACHINES[2:], 75.0)
    rollout.tick(105.0)
    assert rollout.phase == "completed" and rollout.done and rollout.failure is None
    assert [e.text.split(":")[0] for e in rollout.history][:2] == ["stage 1/3", "stage 1"]


@pytest.mark.parametrize("report, gate", [
    (dict(p95=13.0), "gate latency"),
    (dict(error_rate=0.05), "gate errors"),
    (dict(ratio=0.2), "gate drift"),
    (dict(loaded=False), "gate loaded"),
])
def test_a_failed_gate_rolls_back_every_machine_that_got_the_new_version(report, gate):
    rollout = Rollout(plan())
    baseline(rollout)
    rollout.start(0.0)
    swap(rollout, ["m01"], 1.0)
    rollout.tick(31.0)
    swap(rollout, ["m02"], 32.0)
    (action,) = swap(rollout, ["m02"], 40.0, **report)
    assert isinstance(action, Rollback) and action.machines == ("m01", "m02") and action.to == OLD
    assert action.reason.startswith(gate) and rollout.phase == "rolling_back"
    for m in ("m01", "m02"):
        rollout.report(45.0, healthy(m, OLD))
    assert rollout.phase == "rolled_back" and rollout.failure.startswith(gate)


def test_drift_waits_for_enough_frames_on_the_new_version():
    rollout = Rollout(plan(gates=Gates(drift_min_frames=50)))
    baseline(rollout)
    rollout.start(0.0)
    assert swap(rollout, ["m01"], 1.0, ratio=0.3, frames=49) == []  # too few frames to judge the shift
    (action,) = swap(rollout, ["m01"], 2.0, ratio=0.3, frames=50)
    assert action.reason == "gate drift: m01 mean defect ratio 0.3 vs 0.02 before (limit ±0.05)"


def test_latency_is_judged_against_the_same_machine_on_the_old_version():
    rollout = Rollout(plan())
    rollout.report(0.0, healthy("m01", OLD, p95=50.0))  # a slow box: 55 ms is fine for it
    rollout.start(1.0)
    assert swap(rollout, ["m01"], 2.0, p95=55.0) == [] and rollout.phase == "soaking"


def test_a_machine_that_never_loads_fails_the_deploy_after_the_timeout():
    rollout = Rollout(plan(gates=Gates(deploy_timeout_s=60.0)))
    baseline(rollout)
    rollout.start(0.0)
    assert rollout.tick(59.0) == []
    (action,) = rollout.tick(61.0)
    assert isinstance(action, Rollback) and "not on seg:1.1.0 after 60 s" in action.reason


def test_pause_holds_the_next_stage_and_abort_rolls_back():
    rollout = Rollout(plan())
    baseline(rollout)
    rollout.start(0.0)
    swap(rollout, ["m01"], 1.0)
    rollout.pause(2.0)
    assert rollout.tick(100.0) == [] and rollout.stage == 0
    assert rollout.resume(101.0) == [Deploy(("m02",), NEW)]
    (action,) = rollout.abort(102.0)
    assert action == Rollback(("m01", "m02"), OLD, "aborted by operator")
    with pytest.raises(RolloutError, match="cannot resume a rollout that is rolling_back"):
        rollout.resume(103.0)


def shadow(rollout: Rollout, machines, now: float, agreement: float, frames: int = 60) -> list:
    """The machines still run the old version and report the candidate's shadow figures."""
    actions = []
    for m in machines:
        actions += rollout.report(now, healthy(m, OLD, shadow_agreement=agreement, shadow_frames=frames))
    return actions


SHADOW_GATES = Gates(min_shadow_agreement=0.9, shadow_frames=50, shadow_timeout_s=100.0)


def test_with_a_shadow_gate_each_stage_shadows_first_and_promotes_on_agreement():
    rollout = Rollout(plan(gates=SHADOW_GATES))
    baseline(rollout)
    assert rollout.start(0.0) == [Shadow(("m01",), NEW)] and rollout.phase == "shadowing"
    assert shadow(rollout, ["m01"], 5.0, 0.95, frames=20) == []  # too few frames compared yet
    assert shadow(rollout, ["m01"], 10.0, 0.95) == [Deploy(("m01",), NEW, promote=True)]
    assert rollout.phase == "deploying" and rollout.shadowing == ()
    swap(rollout, ["m01"], 12.0)
    assert rollout.tick(42.0) == [Shadow(("m02",), NEW)]  # the next stage shadows its new machines only
    assert rollout.pause(43.0) is None and shadow(rollout, ["m02"], 44.0, 0.97) == []  # paused: no promotion
    assert rollout.resume(45.0) == [Deploy(("m02",), NEW, promote=True)]


def test_a_low_shadow_agreement_stops_the_shadow_and_rolls_back_the_earlier_stages():
    rollout = Rollout(plan(gates=SHADOW_GATES))
    baseline(rollout)
    rollout.start(0.0)
    shadow(rollout, ["m01"], 10.0, 0.95)
    swap(rollout, ["m01"], 12.0)
    rollout.tick(42.0)
    actions = shadow(rollout, ["m02"], 50.0, 0.6)
    assert actions == [StopShadow(("m02",)), Rollback(("m01",), OLD, actions[1].reason)]
    assert actions[1].reason == "gate shadow: m02 agreement 0.600 < 0.9 over 60 frames"
    assert rollout.phase == "rolling_back"
    rollout.report(55.0, healthy("m01", OLD))
    assert rollout.phase == "rolled_back"


def test_a_canary_that_never_compares_enough_frames_fails_without_any_deploy():
    rollout = Rollout(plan(gates=SHADOW_GATES))
    baseline(rollout)
    rollout.start(0.0)
    shadow(rollout, ["m01"], 50.0, 0.99, frames=10)
    assert rollout.tick(100.0) == []
    assert rollout.tick(101.0) == [StopShadow(("m01",))]
    assert rollout.phase == "rolled_back" and "fewer than 50 frames in 100 s" in (rollout.failure or "")


def test_a_shadow_that_cannot_start_fails_the_gate():
    rollout = Rollout(plan(gates=SHADOW_GATES))
    baseline(rollout)
    rollout.start(0.0)
    assert rollout.report(1.0, Health("m01", NEW, loaded=False)) == [StopShadow(("m01",))]
    assert rollout.failure == f"gate shadow: m01 could not run {NEW} in shadow mode"


def test_a_rollback_that_does_not_finish_ends_with_the_stragglers_named():
    rollout = Rollout(plan(gates=Gates(rollback_timeout_s=10.0)))
    baseline(rollout)
    rollout.start(0.0)
    swap(rollout, ["m01"], 1.0, error_rate=1.0)
    rollout.tick(20.0)
    assert rollout.phase == "rolled_back" and "still not on seg:1.0.0: m01" in rollout.history[-1].text


def test_a_rollout_saved_mid_stage_and_restored_goes_on_the_same_way():
    straight = Rollout(plan())
    baseline(straight)
    straight.start(0.0)
    swap(straight, ["m01"], 1.0)
    saved = json.loads(json.dumps(rollout_to_dict(straight)))  # through JSON, as the database holds it
    restored = rollout_from_dict(saved)
    for rollout in (straight, restored):
        assert rollout.tick(31.0) == [Deploy(("m02",), NEW)]
        assert swap(rollout, ["m02"], 32.0, p95=30.0)[0].machines == ("m01", "m02")  # latency vs old baseline
    assert rollout_to_dict(restored) == rollout_to_dict(straight)


def test_a_rollout_saved_while_shadowing_and_restored_promotes_the_same_machines():
    straight = Rollout(plan(gates=SHADOW_GATES))
    baseline(straight)
    straight.start(0.0)
    restored = rollout_from_dict(json.loads(json.dumps(rollout_to_dict(straight))))
    assert restored.shadowing == ("m01",) and restored.phase == "shadowing"
    for rollout in (straight, restored):
        assert shadow(rollout, ["m01"], 10.0, 0.95) == [Deploy(("m01",), NEW, promote=True)]


def test_a_drift_failure_shows_small_means_apart():
    """Defect ratios are often below 0.001: the reason must not read "0.000 vs 0.000"."""
    rollout = Rollout(plan(gates=Gates(max_drift=0.0)))
    for m in MACHINES:
        rollout.report(0.0, healthy(m, OLD, ratio=0.000298))
    rollout.start(0.0)
    (action,) = swap(rollout, ["m01"], 1.0, ratio=0.000312)
    assert action.reason == "gate drift: m01 mean defect ratio 0.000312 vs 0.000298 before (limit ±0)"
