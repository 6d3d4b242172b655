"""bench.rollout's reading of a rollout's history."""

from __future__ import annotations

from bench.rollout import _rollback_s, _stage_times


def test_stage_times_and_rollback_time_from_history():
    history = [
        {"ts": 10.0, "phase": "deploying", "text": "stage 1/3: deploying p to m01"},
        {"ts": 10.5, "phase": "soaking", "text": "stage 1: all 1 machines on p; soaking"},
        {"ts": 15.5, "phase": "shadowing", "text": "stage 2/3: shadowing p on m02"},
        {"ts": 16.0, "phase": "rolling_back", "text": "stopping the shadow on m02: gate shadow"},
        {"ts": 16.0, "phase": "rolling_back", "text": "rolling back m01 to q: gate shadow"},
        {"ts": 16.25, "phase": "rolled_back", "text": "all machines back on q"},
    ]
    assert _stage_times(history) == [5.5, 0.75]  # a stage starts with its deploy or its shadow
    assert _rollback_s(history) == 0.25
    assert _rollback_s(history[:3]) is None
