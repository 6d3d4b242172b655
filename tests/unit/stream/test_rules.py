"""The pure rules engine, driven with scripted event-time timelines; no brokers."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.messages import (
    AlarmSpan,
    Alert,
    Anomaly,
    Command,
    Decision,
    DefectRegion,
    Envelope,
    Event,
    FrameResult,
    Heartbeat,
    ModelOutput,
    Result,
    stable_msg_id,
)
from stream.rule_config import RuleConfig
from stream.rules import (RATE_BUFFER_CAP, VALUE_CAP, BoundedStates, EngineStats, Observation, RulesEngine, RuleState,
                          add_point, evaluate, observations)

# ---------------------------------------------------------------- builders


def output(ratio: float = 0.0, regions: int = 0, score: float = 0.5, latency: float = 10.0, model: str = "seg") -> ModelOutput:
    return ModelOutput(
        model=model, version="1.0.0", latency_ms=latency, defect_ratio=ratio,
        regions=[DefectRegion(cls="scratch", area=10, bbox=(0, 0, 4, 4), score=score) for _ in range(regions)],
    )


def result(ts: float, ratio: float = 0.0, machine: str = "m01", camera: str = "cam1", model: str = "seg", **kw: Any) -> Result:
    """One camera, one frame at ``ts``, one model output."""
    frame = FrameResult(seq=int(ts * 10), ts=ts, outputs=[output(ratio, model=model)])
    return Result(site="s1", machine=machine, camera=camera, ts=ts, frames=[frame], **kw)


def anomaly(ts: float, score: float, machine: str = "m01", group: str = "spindle", model: str = "lstm") -> Anomaly:
    return Anomaly(
        site="s1", machine=machine, ts=ts, group=group, seq=int(ts), model=model, version="2",
        score=score, threshold=1.0, is_anomaly=score >= 1.0,
    )


def rule(**kw: Any) -> RuleConfig:
    base: dict[str, Any] = {"name": "defects", "metric": "defect_ratio", "condition": {"op": ">=", "value": 0.05}}
    return RuleConfig.model_validate(base | kw)


def run(engine: RulesEngine, messages: list[Envelope]) -> list[Envelope]:
    return [out for m in messages for out in engine.process(m)]


def transitions(outputs: list[Envelope]) -> list[tuple[str, str, float]]:
    """(key, state, ts) of every Decision, in order."""
    return [(d.key, d.state, d.ts) for d in outputs if isinstance(d, Decision)]


def of(kind: type[Envelope], outputs: list[Envelope]) -> list[Any]:
    return [o for o in outputs if isinstance(o, kind)]


# ---------------------------------------------------------------- observations


def test_result_yields_one_observation_per_frame_per_output() -> None:
    frames = [
        FrameResult(seq=1, ts=1.0, outputs=[output(0.1, regions=2, score=0.9, latency=12.0), output(0.0, model="seg2")]),
        FrameResult(seq=2, ts=1.5, outputs=[output(0.2, regions=1, score=0.3)], gated=True),
    ]
    msg = Result(site="s1", machine="m01", camera="cam2", ts=1.0, frames=frames)
    obs = observations(msg, {"m01": "L1"})
    assert [(o.ts, o.model) for o in obs] == [(1.0, "seg"), (1.0, "seg2"), (1.5, "seg")]
    assert obs[0] == Observation(
        site="s1", machine="m01", line="L1", model="seg", ts=1.0, camera="cam2",
        values={"defect_ratio": 0.1, "defect_count": 2.0, "max_score": 0.9, "latency_ms": 12.0, "alarm": 0.0},
    )
    assert obs[1].values["max_score"] == 0.0  # no regions
    assert obs[2].values["defect_count"] == 1.0  # gated frames still count
    assert obs[0].source == "cam2"


def test_anomaly_yields_one_observation_with_group_as_source() -> None:
    (obs,) = observations(anomaly(5.0, 1.7))
    assert (obs.machine, obs.group, obs.camera, obs.line, obs.ts) == ("m01", "spindle", None, "unassigned", 5.0)
    assert obs.values == {"anomaly_score": 1.7, "anomaly_level": 1.7}
    assert obs.source == "spindle"


@pytest.mark.parametrize(
    "message",
    [
        Heartbeat(site="s1", machine="m01", ts=1.0, uptime_s=3.0),
        Event(site="s1", machine="m01", ts=1.0, name="camera_reconnected"),
        Command(site="s1", machine="m01", ts=1.0, name="snapshot"),
        Alert(site="s1", machine="m01", ts=1.0, rule="r", state="firing", severity="info", scope="machine", key="m01", value=1.0),
        Decision(site="s1", machine="m01", ts=1.0, rule="r", state="firing", scope="machine", key="m01", value=1.0),
    ],
)
def test_other_messages_produce_nothing_but_are_counted(message: Envelope) -> None:
    engine = RulesEngine([rule(condition={"op": ">=", "value": 0.0})])
    assert observations(message) == []
    assert engine.process(message) == []
    assert engine.stats == EngineStats(messages=1)


def test_anomaly_observation_carries_the_alarm_channels_else_the_top_channels() -> None:
    top = anomaly(5.0, 1.7).model_copy(update={"top_channels": ["Current", "Pressure"]})
    assert observations(top)[0].channels == ("Current", "Pressure")
    event = AlarmSpan(start_seq=3, start_ts=3.0, peak_level=2.0, channels=["Voltage"])
    assert observations(top.model_copy(update={"alarm": event}))[0].channels == ("Voltage",)
    assert observations(anomaly(5.0, 1.7))[0].channels == ()
    (obs,) = observations(top)
    assert Observation.from_dict(json.loads(json.dumps(obs.to_dict()))) == obs  # as a worker forwards it
    old = {k: v for k, v in obs.to_dict().items() if k != "channels"}  # forwarded by a worker before this field
    assert Observation.from_dict(old).channels == ()


def test_anomaly_alert_text_names_the_top_channels_and_ids_do_not_depend_on_them() -> None:
    pump = rule(name="pump-anomaly", description="pump sensors off their forecast", metric="anomaly_level",
                condition={"op": ">=", "value": 1.0}, scope="machine", actions=[{"type": "alert"}])
    plain = RulesEngine([pump]).process(anomaly(1.0, 3.0))
    named = RulesEngine([pump]).process(
        anomaly(1.0, 3.0).model_copy(update={"top_channels": ["VolumeFlowRateRMS", "Pressure"]}))
    (alert,) = of(Alert, named)
    assert alert.text == ("pump sensors off their forecast: firing: anomaly_level 3 (limit >= 1) on m01 "
                          "(top channels: VolumeFlowRateRMS, Pressure)")
    assert of(Alert, plain)[0].text == "pump sensors off their forecast: firing: anomaly_level 3 (limit >= 1) on m01"
    assert [m.msg_id for m in named] == [m.msg_id for m in plain]


# ---------------------------------------------------------------- kinds


def test_threshold_fires_and_resolves_on_the_observation() -> None:
    engine = RulesEngine([rule(description="Scratches on the housing", severity="critical")], lines={"m01": "L1"})
    assert engine.process(result(1.0, 0.01)) == []
    fired = engine.process(result(2.0, 0.12, camera="cam2"))
    decision, alert = fired
    assert isinstance(decision, Decision) and isinstance(alert, Alert)
    assert (decision.state, decision.key, decision.scope, decision.value, decision.ts) == ("firing", "m01/cam2", "camera", 0.12, 2.0)
    assert decision.actions == ["alert"]
    assert (decision.site, decision.machine) == ("s1", "m01")
    assert decision.msg_id == stable_msg_id("defects", "m01/cam2", "firing", 2.0, "decision")
    assert (alert.rule, alert.state, alert.severity, alert.camera, alert.line, alert.value) == (
        "defects", "firing", "critical", "cam2", None, 0.12,
    )
    assert alert.text == "Scratches on the housing: firing: defect_ratio 0.12 (limit >= 0.05) on m01/cam2"
    assert alert.msg_id == stable_msg_id("defects", "m01/cam2", "firing", 2.0, "alert")
    assert engine.process(result(3.0, 0.30, camera="cam2")) == []  # still firing: nothing new
    resolved = engine.process(result(4.0, 0.0, camera="cam2"))
    assert transitions(resolved) == [("m01/cam2", "resolved", 4.0)]
    assert of(Alert, resolved)[0].value == 0.0
    assert engine.stats == EngineStats(messages=4, observations=4, decisions=2, alerts=2)


@pytest.mark.parametrize(("op", "value", "bad"), [(">", 0.05, False), (">=", 0.05, True), ("<", 0.05, False), ("<=", 0.05, True)])
def test_threshold_operators(op: str, value: float, bad: bool) -> None:
    engine = RulesEngine([rule(condition={"op": op, "value": value})])
    assert bool(engine.process(result(1.0, 0.05))) is bad


def test_metric_choice_uses_region_count_score_and_latency() -> None:
    frame = FrameResult(seq=1, ts=1.0, outputs=[output(0.0, regions=3, score=0.8, latency=250.0)])
    msg = Result(site="s1", machine="m01", camera="cam1", ts=1.0, frames=[frame])
    engine = RulesEngine([
        rule(name="count", metric="defect_count", condition={"op": ">=", "value": 3}),
        rule(name="score", metric="max_score", condition={"op": ">", "value": 0.9}),
        rule(name="slow", metric="latency_ms", condition={"op": ">", "value": 200}),
    ])
    assert [(d.rule, d.value) for d in of(Decision, engine.process(msg))] == [("count", 3.0), ("slow", 250.0)]


def test_k_of_n_counts_bad_among_last_n_and_reports_the_count() -> None:
    engine = RulesEngine([rule(kind="k_of_n", k=3, n=5, window_s=100)])
    ratios = [0.1, 0.0, 0.0, 0.0, 0.1, 0.0, 0.1, 0.1]  # bad at t=0, 4, 6, 7
    out = run(engine, [result(float(t), r) for t, r in enumerate(ratios)])
    assert transitions(out) == [("m01/cam1", "firing", 7.0)]  # the last 5 at t=7 (3..7) hold 4, 6, 7
    assert of(Alert, out)[0].value == 3.0
    assert of(Alert, out)[0].text == "firing: 3 of last 5 defect_ratio >= 0.05 within 100s on m01/cam1"


def test_k_of_n_forgets_bad_observations_outside_the_window() -> None:
    engine = RulesEngine([rule(kind="k_of_n", k=2, n=5, window_s=10)])
    assert run(engine, [result(0.0, 0.1), result(11.0, 0.1)]) == []  # 0 is 11 s before 11: out of window
    out = engine.process(result(12.0, 0.1))
    assert transitions(out) == [("m01/cam1", "firing", 12.0)]
    assert of(Decision, out)[0].value == 2.0


def test_k_of_n_resolves_when_count_drops_below_k() -> None:
    engine = RulesEngine([rule(kind="k_of_n", k=2, n=3, window_s=100)])
    out = run(engine, [result(float(t), r) for t, r in enumerate([0.1, 0.1, 0.0, 0.0])])
    assert transitions(out) == [("m01/cam1", "firing", 1.0), ("m01/cam1", "resolved", 3.0)]
    assert of(Decision, out)[1].value == 1.0


def test_rate_of_change_up() -> None:
    engine = RulesEngine([rule(kind="rate_of_change", metric="latency_ms", condition={"op": ">=", "value": 10}, window_s=5)])
    lat = {0: 10, 1: 12, 2: 14, 3: 30, 4: 60, 5: 60, 6: 60, 7: 60, 8: 60, 9: 60}
    msgs = [Result(site="s1", machine="m01", camera="cam1", ts=t, frames=[FrameResult(seq=t, ts=t, outputs=[output(latency=v)])]) for t, v in lat.items()]
    out = run(engine, msgs)
    # window 5 s: at t=3 rate = (30-10)/3 = 6.67; at t=4 (60-10)/4 = 12.5 -> fires;
    # at t=5 (60-10)/5 = 10 still; at t=6 the window is 1..6: (60-12)/5 = 9.6 -> resolves.
    assert transitions(out) == [("m01/cam1", "firing", 4.0), ("m01/cam1", "resolved", 6.0)]
    assert of(Alert, out)[0].value == pytest.approx(12.5)
    assert of(Alert, out)[1].value == pytest.approx(9.6)


def test_rate_of_change_down() -> None:
    engine = RulesEngine([rule(kind="rate_of_change", metric="anomaly_score", condition={"op": "<=", "value": -0.5}, window_s=4)])
    out = run(engine, [anomaly(float(t), s) for t, s in enumerate([5.0, 4.9, 4.0, 2.0])])
    # at t=2: (4.0-5.0)/2 = -0.5 -> fires
    assert transitions(out) == [("m01/spindle", "firing", 2.0)]
    assert of(Alert, out)[0].value == pytest.approx(-0.5)
    assert "changing -0.5/s" in of(Alert, out)[0].text


def test_rate_of_change_needs_two_observations_apart_in_time() -> None:
    engine = RulesEngine([rule(kind="rate_of_change", condition={"op": ">=", "value": 0.0}, window_s=5)])
    assert engine.process(result(1.0, 0.5)) == []  # one point: unknown
    two_models_same_frame = Result(
        site="s1", machine="m01", camera="cam1", ts=1.0,
        frames=[FrameResult(seq=1, ts=1.0, outputs=[output(0.1), output(0.9, model="seg2")])],
    )
    engine2 = RulesEngine([rule(kind="rate_of_change", condition={"op": ">=", "value": 0.0}, window_s=5)])
    assert engine2.process(two_models_same_frame) == []  # no time between them: unknown
    assert transitions(engine.process(result(2.0, 0.5))) == [("m01/cam1", "firing", 2.0)]  # rate 0 >= 0


# ---------------------------------------------------------------- scopes


def test_camera_scope_keeps_cameras_apart_machine_scope_aggregates_them() -> None:
    # Each camera has 1 bad of its last 2; the machine has 2 bad of its last 4.
    msgs = [
        result(0.0, 0.1, camera="cam1"), result(0.0, 0.0, camera="cam2"),
        result(1.0, 0.0, camera="cam1"), result(1.0, 0.1, camera="cam2"),
    ]
    per_camera = RulesEngine([rule(kind="k_of_n", k=2, n=2, scope="camera")])
    per_machine = RulesEngine([rule(kind="k_of_n", k=2, n=4, scope="machine")])
    assert run(per_camera, msgs) == []
    out = run(per_machine, msgs)
    assert transitions(out) == [("m01", "firing", 1.0)]
    assert of(Alert, out)[0].camera is None and of(Alert, out)[0].line is None


def test_line_scope_aggregates_machines_of_a_line() -> None:
    lines = {"m01": "L1", "m02": "L1", "m03": "L2"}
    engine = RulesEngine([rule(kind="k_of_n", k=2, n=10, scope="line")], lines=lines)
    assert engine.process(result(0.0, 0.1, machine="m01")) == []
    assert engine.process(result(0.5, 0.1, machine="m03")) == []  # other line
    out = engine.process(result(1.0, 0.1, machine="m02"))
    assert transitions(out) == [("line:L1", "firing", 1.0)]
    decision, alert = out
    assert decision.machine == "m02"  # the observing machine
    assert (alert.line, alert.camera, alert.scope) == ("L1", None, "line")


def test_machine_without_a_line_is_unassigned() -> None:
    engine = RulesEngine([rule(scope="line")], lines={"m01": "L1"})
    out = engine.process(result(0.0, 0.1, machine="m09"))
    assert transitions(out) == [("line:unassigned", "firing", 0.0)]


# ---------------------------------------------------------------- match filters


@pytest.mark.parametrize(
    ("match", "fires"),
    [
        ({}, True),
        ({"machines": ["m01"]}, True),
        ({"machines": ["m02"]}, False),
        ({"cameras": ["cam1", "cam3"]}, True),
        ({"cameras": ["cam2"]}, False),
        ({"lines": ["L1"]}, True),
        ({"lines": ["L2"]}, False),
        ({"models": ["seg"]}, True),
        ({"models": ["other"]}, False),
        ({"groups": ["spindle"]}, True),  # groups do not apply to results
        ({"machines": ["m01"], "lines": ["L2"]}, False),  # all filters must pass
    ],
)
def test_match_filters_on_results(match: dict[str, list[str]], fires: bool) -> None:
    engine = RulesEngine([rule(match=match)], lines={"m01": "L1"})
    assert bool(engine.process(result(0.0, 0.5))) is fires


@pytest.mark.parametrize(("match", "fires"), [({"groups": ["spindle"]}, True), ({"groups": ["coolant"]}, False), ({"models": ["seg"]}, False)])
def test_match_filters_on_anomalies(match: dict[str, list[str]], fires: bool) -> None:
    engine = RulesEngine([rule(metric="anomaly_score", condition={"op": ">", "value": 1.0}, match=match)])
    assert bool(engine.process(anomaly(0.0, 2.0))) is fires


def test_rules_only_see_observations_carrying_their_metric() -> None:
    engine = RulesEngine([
        rule(name="anom", metric="anomaly_score", condition={"op": ">=", "value": 0.0}),
        rule(name="res", condition={"op": ">=", "value": 0.0}),
    ])
    assert [d.rule for d in of(Decision, engine.process(result(0.0)))] == ["res"]
    assert [d.rule for d in of(Decision, engine.process(anomaly(0.0, 0.1)))] == ["anom"]


# ---------------------------------------------------------------- hysteresis


def test_hold_for_fires_only_after_the_condition_held_long_enough() -> None:
    engine = RulesEngine([rule(hold_for_s=3.0)])
    script = [(0, 0.1), (1, 0.1), (2, 0.1), (2.5, 0.0),  # interrupted before 3 s: no fire
              (3, 0.1), (4, 0.1), (5, 0.1), (5.9, 0.1),  # bad since 3, only 2.9 s
              (6, 0.1), (7, 0.1)]  # 3 s at t=6: fires once
    out = run(engine, [result(float(t), r) for t, r in script])
    assert transitions(out) == [("m01/cam1", "firing", 6.0)]


def test_clear_after_resolves_only_after_the_condition_stayed_false() -> None:
    engine = RulesEngine([rule(clear_after_s=5.0)])
    script = [(0, 0.1),  # fires at once (hold 0)
              (1, 0.0), (4, 0.0), (5, 0.2),  # good for 4 s, then a bad blip: still firing
              (6, 0.0), (10, 0.0), (10.9, 0.0),  # good since 6, 4.9 s
              (11, 0.0), (12, 0.0)]  # 5 s at 11: resolves once
    out = run(engine, [result(float(t), r) for t, r in script])
    assert transitions(out) == [("m01/cam1", "firing", 0.0), ("m01/cam1", "resolved", 11.0)]


def test_no_flapping_on_alternating_values_with_hysteresis() -> None:
    engine = RulesEngine([rule(hold_for_s=1.0, clear_after_s=1.0)])
    out = run(engine, [result(t * 0.5, 0.1 if t % 2 else 0.0) for t in range(40)])
    assert out == []


def test_refires_after_resolve_with_new_ids() -> None:
    engine = RulesEngine([rule()])
    out = run(engine, [result(float(t), r) for t, r in enumerate([0.1, 0.0, 0.1, 0.0])])
    assert transitions(out) == [
        ("m01/cam1", "firing", 0.0), ("m01/cam1", "resolved", 1.0),
        ("m01/cam1", "firing", 2.0), ("m01/cam1", "resolved", 3.0),
    ]
    ids = [o.msg_id for o in out]
    assert len(set(ids)) == len(ids)


# ---------------------------------------------------------------- event time


def test_observations_beyond_allowed_lateness_are_dropped_and_counted() -> None:
    engine = RulesEngine([rule()], allowed_lateness_s=2.0)
    engine.process(result(10.0, 0.0))
    assert engine.process(result(7.5, 0.9)) == []
    assert engine.stats.late == 1
    assert engine.process(result(8.0, 0.9)) == []  # exactly at the watermark: accepted ...
    assert engine.stats.late == 1  # ... but a threshold rule judges the newest observation (t=10, good)


def test_late_count_is_once_per_observation_even_with_many_rules() -> None:
    engine = RulesEngine([rule(name="a"), rule(name="b", scope="machine")], allowed_lateness_s=1.0)
    engine.process(result(10.0))
    engine.process(result(5.0))
    assert engine.stats.late == 1


def test_out_of_order_within_lateness_is_inserted_and_reevaluated_at_the_key_clock() -> None:
    engine = RulesEngine([rule(kind="k_of_n", k=2, n=3, window_s=10)], allowed_lateness_s=2.0)
    assert run(engine, [result(10.0, 0.1), result(11.0, 0.0)]) == []
    out = engine.process(result(9.5, 0.1))  # late but within lateness: 2 of last 3 are bad
    assert transitions(out) == [("m01/cam1", "firing", 11.0)]  # stamped with the key's clock
    assert engine.stats.late == 0


def test_out_of_order_observation_falls_outside_last_n() -> None:
    engine = RulesEngine([rule(kind="k_of_n", k=2, n=2, window_s=10)], allowed_lateness_s=5.0)
    run(engine, [result(10.0, 0.1), result(11.0, 0.0)])
    assert engine.process(result(9.0, 0.1)) == []  # inserted before t=10: not among the last 2


def test_out_of_order_rate_uses_the_event_time_order() -> None:
    engine = RulesEngine([rule(kind="rate_of_change", condition={"op": ">=", "value": 0.1}, window_s=10)], allowed_lateness_s=5.0)
    assert engine.process(result(10.0, 0.5)) == []
    out = engine.process(result(8.0, 0.1))  # arrives late, but is older: rate (0.5-0.1)/2 = 0.2
    assert transitions(out) == [("m01/cam1", "firing", 10.0)]
    assert of(Decision, out)[0].value == pytest.approx(0.2)


@given(st.lists(st.tuples(st.floats(0, 12), st.sampled_from([0.0, 0.1]), st.booleans()), max_size=80))
def test_k_of_n_window_and_count_equal_a_recount_through_late_points_trims_and_restores(
        arrivals: list[tuple[float, float, bool]]) -> None:
    """The window add_point keeps and the bad count it carries (not stored: a restore forgets it)
    equal the docstring's definition worked out from every accepted point."""
    k_of_n = rule(kind="k_of_n", k=3, n=5, window_s=2)
    state, accepted = RuleState(), []
    for ts, value, restore in arrivals:
        if restore:
            state = RuleState.from_dict(json.loads(json.dumps(state.to_dict())))
        if not add_point(state, k_of_n, 1.5, ts, value):
            assert ts < state.clock - 1.5
            continue
        accepted.insert(sum(t <= ts for t, _ in accepted), (ts, value))  # ties keep arrival order
        window = [p for p in accepted if p[0] >= state.clock - 2][-5:]
        bad = sum(v >= 0.05 for _, v in window)
        assert state.points == window
        assert evaluate(k_of_n, state) == (bad >= 3, float(bad))


def test_hold_for_measured_in_event_time_not_arrival_order() -> None:
    engine = RulesEngine([rule(hold_for_s=2.0)], allowed_lateness_s=5.0)
    assert run(engine, [result(0.0, 0.1), result(1.0, 0.1), result(0.5, 0.1)]) == []
    assert transitions(engine.process(result(2.0, 0.1))) == [("m01/cam1", "firing", 2.0)]


# ---------------------------------------------------------------- dedupe


def test_repeated_msg_id_produces_nothing() -> None:
    engine = RulesEngine([rule(kind="k_of_n", k=2, n=2)])
    msg = result(0.0, 0.1)
    assert engine.process(msg) == []
    assert engine.process(msg.model_copy()) == []  # a redelivery must not count as a second bad frame
    assert engine.stats.duplicates == 1
    assert engine.stats.observations == 1


def test_dedupe_entries_expire_after_ttl() -> None:
    engine = RulesEngine([rule()], dedupe_ttl_s=5.0)
    first = result(0.0, 0.0)
    engine.process(first)
    engine.process(result(10.0, 0.0))
    engine.process(first)
    assert engine.stats.duplicates == 0


def test_dedupe_clocks_are_per_machine() -> None:
    """Defect 2: one machine's far-future message made every other machine's ids expire."""
    engine = RulesEngine([rule(kind="k_of_n", k=2, n=2)], dedupe_ttl_s=60.0)
    engine.process(result(365 * 86_400.0, 0.0, machine="m09"))
    twice = result(10.0, 0.1, machine="m04")
    assert run(engine, [twice, twice.model_copy(), twice.model_copy()]) == []  # k=2: a repeat would fire
    assert engine.stats.duplicates == 2


# ---------------------------------------------------------------- refused, capped, bounded


def test_a_far_future_observation_is_refused_and_leaves_the_clock_alone() -> None:
    """Defect 1: one result a year ahead made the key's clock drop every later observation as late."""
    engine = RulesEngine([rule()], max_ahead_s=60.0)
    now = 1_000_000.0
    assert engine.process(result(now + 365 * 86_400.0, 0.5), now=now) == []
    assert engine.stats.refused == 1
    assert engine.states == {}  # nothing stored, no clock moved
    assert transitions(engine.process(result(now, 0.5), now=now)) == [("m01/cam1", "firing", now)]
    assert engine.process(result(now + 59.0, 0.5), now=now) == []  # within the skew: accepted (still firing)
    assert (engine.stats.refused, engine.stats.late) == (1, 0)


def test_an_anomaly_level_overflowing_to_inf_is_capped_and_fires() -> None:
    """Defect 5: score 1e308 / threshold 1e-300 gave level inf: the Decision failed after the state changed."""
    engine = RulesEngine([rule(name="pump", metric="anomaly_level", condition={"op": ">=", "value": 1.0}, scope="machine")])
    huge = Anomaly(site="s1", machine="m01", ts=1.0, group="pump1", seq=1, model="lstm", version="2",
                   score=1e308, threshold=1e-300, is_anomaly=True)
    fired = engine.process(huge)
    assert [(d.state, d.value) for d in of(Decision, fired)] == [("firing", VALUE_CAP)]
    assert of(Alert, fired)[0].value == VALUE_CAP
    resolved = engine.process(anomaly(2.0, 0.1))
    assert [d.state for d in of(Decision, resolved)] == ["resolved"]


def test_a_rate_overflowing_to_inf_is_capped() -> None:
    engine = RulesEngine([rule(kind="rate_of_change", metric="latency_ms", condition={"op": ">=", "value": 1.0})])
    slow = Result(site="s1", machine="m01", camera="cam1", ts=1.000001, frames=[FrameResult(
        seq=2, ts=1.000001, outputs=[output(latency=1.7e308)])])
    run(engine, [result(1.0)])
    assert [(d.state, d.value) for d in of(Decision, engine.process(slow))] == [("firing", VALUE_CAP)]


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_observations_with_non_finite_numbers_are_refused(bad: float) -> None:
    engine = RulesEngine([rule()])
    obs = Observation(site="s1", machine="m01", line="L1", model="seg", ts=1.0, values={"defect_ratio": bad},
                      camera="cam1")
    timeless = Observation(**(obs.to_dict() | {"ts": bad, "values": {"defect_ratio": 0.5}}))
    assert engine.observe_all([obs, timeless]) == []
    assert engine.stats.refused == 2 and engine.states == {}


def test_rule_states_are_bounded_least_recently_updated_first() -> None:
    engine = RulesEngine([rule()], max_states=3)
    run(engine, [result(float(i), 0.0, camera=f"cam{i}") for i in range(5)])
    assert sorted(engine.states) == ["defects|m01/cam2", "defects|m01/cam3", "defects|m01/cam4"]
    assert isinstance(engine.states, BoundedStates) and engine.states.evicted == 2
    with pytest.raises(ValueError):
        BoundedStates(0)


# ---------------------------------------------------------------- commands


def test_commands_on_firing_and_on_resolved() -> None:
    actions = [
        {"type": "alert"},
        {"type": "command", "name": "snapshot", "args": {"frames": 3}},
        {"type": "command", "name": "reject_off", "on": "resolved"},
    ]
    engine = RulesEngine([rule(actions=actions)])
    fired = engine.process(result(1.0, 0.1, camera="cam2"))
    assert [type(o).__name__ for o in fired] == ["Decision", "Alert", "Command"]
    decision, _, cmd = fired
    assert decision.actions == ["alert", "command:snapshot"]
    assert (cmd.machine, cmd.camera, cmd.name, cmd.args, cmd.ts) == ("m01", "cam2", "snapshot", {"frames": 3}, 1.0)
    assert cmd.msg_id == stable_msg_id("defects", "m01/cam2", "firing", 1.0, "command", 0, "snapshot", "m01")
    assert cmd.reason.startswith("defects firing: defect_ratio 0.1")
    resolved = engine.process(result(2.0, 0.0, camera="cam2"))
    assert of(Decision, resolved)[0].actions == ["alert", "command:reject_off"]
    assert [c.name for c in of(Command, resolved)] == ["reject_off"]
    assert engine.stats.commands == 2


def test_rule_without_alert_action_emits_decision_and_commands_only() -> None:
    engine = RulesEngine([rule(actions=[{"type": "command", "name": "stop_line"}], scope="machine")])
    out = engine.process(result(1.0, 0.1))
    assert [type(o).__name__ for o in out] == ["Decision", "Command"]
    assert out[1].camera is None
    assert engine.stats == EngineStats(messages=1, observations=1, decisions=1, alerts=0, commands=1)


def test_line_scope_commands_fan_out_to_every_machine_of_the_line() -> None:
    lines = {"m03": "L1", "m01": "L1", "m02": "L2"}
    engine = RulesEngine([rule(scope="line", actions=[{"type": "command", "name": "slow_down"}])], lines=lines)
    out = engine.process(result(1.0, 0.1, machine="m07"))  # not in the line map: its own line
    assert [c.machine for c in of(Command, out)] == ["m07"]
    engine2 = RulesEngine([rule(scope="line", actions=[{"type": "command", "name": "slow_down"}])], lines=lines | {"m07": "L1"})
    out2 = engine2.process(result(1.0, 0.1, machine="m03"))
    assert [c.machine for c in of(Command, out2)] == ["m01", "m03", "m07"]
    assert len({c.msg_id for c in of(Command, out2)}) == 3
    assert of(Decision, out2)[0].machine == "m03"


# ---------------------------------------------------------------- anomalies


def test_anomaly_rule_per_sensor_group() -> None:
    engine = RulesEngine(
        [rule(name="vibration", metric="anomaly_score", condition={"op": ">", "value": 1.0}, actions=[{"type": "alert"}, {"type": "command", "name": "inspect"}])]
    )
    assert engine.process(anomaly(0.0, 0.4)) == []
    assert engine.process(anomaly(0.0, 3.0, group="coolant")) != []
    out = engine.process(anomaly(1.0, 2.5))
    assert transitions(out) == [("m01/spindle", "firing", 1.0)]
    alert, cmd = of(Alert, out)[0], of(Command, out)[0]
    assert (alert.camera, alert.value) == (None, 2.5)
    assert (cmd.machine, cmd.camera) == ("m01", None)


# ---------------------------------------------------------------- determinism and bounds


def _script() -> list[Envelope]:
    msgs: list[Envelope] = []
    for i in range(300):
        machine, camera = f"m0{i % 3}", f"cam{i % 2}"
        ts = 1.0 + i * 0.25 - (0.6 if i % 7 == 0 else 0.0)  # some arrive out of order
        if i % 5 == 0:
            msgs.append(anomaly(ts, (i % 11) / 4, machine=machine))
        else:
            msgs.append(result(ts, ((i * 37) % 100) / 100, machine=machine, camera=camera))
        if i % 13 == 0:
            msgs.append(msgs[-1])  # a redelivery
    return msgs


def _rules() -> list[RuleConfig]:
    snap = {"type": "command", "name": "snapshot"}
    return [
        rule(name="t", hold_for_s=0.5, clear_after_s=0.5, actions=[{"type": "alert"}, snap]),
        rule(name="k", kind="k_of_n", k=3, n=5, window_s=3, scope="machine"),
        rule(name="r", kind="rate_of_change", condition={"op": ">=", "value": 0.5}, window_s=2, scope="line",
             actions=[{"type": "alert"}, snap | {"on": "resolved"}]),
        rule(name="a", metric="anomaly_score", condition={"op": ">", "value": 1.5}),
    ]


def test_same_input_through_two_fresh_engines_gives_identical_output() -> None:
    lines = {"m00": "L1", "m01": "L1", "m02": "L2"}
    msgs = _script()
    first = run(RulesEngine(_rules(), lines=lines), msgs)
    second = run(RulesEngine(_rules(), lines=lines), msgs)
    assert len(of(Decision, first)) > 10 and of(Command, first) and of(Alert, first)
    assert [o.to_json() for o in first] == [o.to_json() for o in second]


def test_reprocessing_from_a_fresh_engine_regenerates_the_same_ids() -> None:
    msgs = _script()
    ids = {o.msg_id for o in run(RulesEngine(_rules()), msgs)}
    # A replay of the whole stream (a restarted runner without state) yields nothing new downstream.
    assert {o.msg_id for o in run(RulesEngine(_rules()), msgs)} == ids


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 3), st.sampled_from([0.0, 0.1])), max_size=60), st.floats(0, 2), st.floats(0, 2))
def test_transitions_alternate_starting_with_firing(steps: list[tuple[float, float]], hold: float, clear: float) -> None:
    engine = RulesEngine([rule(hold_for_s=hold, clear_after_s=clear)], allowed_lateness_s=1.0)
    ts, msgs = 0.0, []
    for dt, ratio in steps:
        ts += dt - 0.5  # sometimes goes back in time
        msgs.append(result(max(ts, 0.0), ratio))
    found = transitions(run(engine, msgs))
    states = [s for _, s, _ in found]
    assert states == ["firing", "resolved"] * (len(states) // 2) + ["firing"] * (len(states) % 2)
    stamps = [t for _, _, t in found]
    assert stamps == sorted(stamps)


@pytest.fixture(scope="module")
def busy_camera() -> list[Result]:
    """100,000 frames of one camera, 4 per second, 1000 per message, bad and good in turns of 1000."""
    return [
        Result(
            site="s1", machine="m01", camera="cam1", ts=first * 0.25,
            frames=[FrameResult(seq=i, ts=i * 0.25, outputs=[output(0.1 * (first // 1000 % 2))]) for i in range(first, first + 1000)],
        )
        for first in range(0, 100_000, 1000)
    ]


@pytest.mark.parametrize(
    ("kwargs", "bound"),
    [
        ({}, 1),
        ({"kind": "k_of_n", "k": 3, "n": 7, "window_s": 1e6}, 7),
        ({"kind": "rate_of_change", "window_s": 1e6}, RATE_BUFFER_CAP),
        ({"kind": "rate_of_change", "window_s": 1.0}, 5),
    ],
)
def test_memory_stays_bounded_for_one_busy_key(busy_camera: list[Result], kwargs: dict[str, Any], bound: int) -> None:
    engine = RulesEngine([rule(**kwargs)])
    for msg in busy_camera:
        engine.process(msg)
        assert engine.buffered() <= bound
    assert engine.stats.observations == 100_000
    assert engine.buffered() == bound


def test_anomaly_level_is_score_over_threshold() -> None:
    message = Anomaly(site="s", machine="m1", ts=10.0, group="pump1", seq=0, model="lstm", version="1",
                      score=3.0, threshold=2.0, is_anomaly=True)
    (obs,) = observations(message)
    assert obs.values == {"anomaly_score": 3.0, "anomaly_level": 1.5}


# ---------------------------------------------------------------- state stores and split engines


class JsonStates(dict):
    """A mapping that keeps rule states only as JSON-ready dicts, as a worker's table does."""

    def __getitem__(self, key: str) -> RuleState:
        return RuleState.from_dict(json.loads(super().__getitem__(key)))

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def __setitem__(self, key: str, state: RuleState) -> None:
        super().__setitem__(key, json.dumps(state.to_dict()))

    def values(self) -> list[RuleState]:  # type: ignore[override]
        return [self[key] for key in self]


def mixed_site_rules() -> list[RuleConfig]:
    return [
        rule(name="cam", hold_for_s=0.5, clear_after_s=0.5, actions=[{"type": "alert"}]),
        rule(name="machine-k", kind="k_of_n", k=2, n=3, window_s=5.0, scope="machine",
             actions=[{"type": "alert"}, {"type": "command", "name": "snapshot", "on": "firing"}]),
        rule(name="line-rate", kind="rate_of_change", window_s=4.0, scope="line",
             condition={"op": ">", "value": 0.02}, actions=[{"type": "alert"}]),
        rule(name="pump", metric="anomaly_level", condition={"op": ">=", "value": 1.0}, scope="line"),
    ]


def mixed_site_messages(seed: int) -> list[Envelope]:
    rng = random.Random(seed)
    messages: list[Envelope] = []
    for step in range(200):
        ts = step * 0.25
        machine = rng.choice(["m01", "m02", "m03"])
        if rng.random() < 0.8:
            messages.append(result(ts, rng.choice([0.0, 0.0, 0.08, 0.2]), machine=machine,
                                   camera=rng.choice(["cam1", "cam2"])))
        else:
            messages.append(anomaly(ts, rng.choice([0.3, 1.4]), machine=machine))
    return messages + messages[50:60]  # redeliveries


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_json_backed_states_give_the_same_outputs(seed):
    lines = {"m01": "L1", "m02": "L1", "m03": "L2"}
    messages = mixed_site_messages(seed)
    plain = run(RulesEngine(mixed_site_rules(), lines=lines), messages)
    stored = run(RulesEngine(mixed_site_rules(), lines=lines, states=JsonStates()), messages)
    assert stored == plain and len(of(Alert, plain)) >= 4


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_machine_and_line_engines_together_equal_one_engine(seed):
    """The Kafka worker's split: camera/machine rules where messages are partitioned by machine,
    line rules on the observations forwarded (repartitioned) by line."""
    lines = {"m01": "L1", "m02": "L1", "m03": "L2"}
    messages = mixed_site_messages(seed)
    whole = run(RulesEngine(mixed_site_rules(), lines=lines), messages)
    by_machine = RulesEngine(mixed_site_rules(), lines=lines, scopes=("camera", "machine"))
    by_line = RulesEngine(mixed_site_rules(), lines=lines, scopes=("line",))
    split: list[Envelope] = []
    for message in messages:
        if not by_machine.accept(message):
            continue
        for obs in observations(message, lines):
            split += by_machine.observe(obs)
            if by_line.wants(obs):
                split += by_line.observe(Observation.from_dict(json.loads(json.dumps(obs.to_dict()))))
    assert sorted(split, key=lambda m: m.msg_id) == sorted(whole, key=lambda m: m.msg_id)
    assert {d.scope for d in of(Decision, whole)} == {"camera", "machine", "line"}
