"""bench.rollout's reading of a rollout's history."""

from __future__ import annotations

from bench.rollout import _rollback_s, _stage_times


def test_stage_times_and_rollback_time_from_history():
    history = [
        {"ts": 10.0, "text": "stage 1/3: deploying p to m01"},
        {"ts": 10.5, "text": "stage 1: all 1 machines on p; soaking"},
        {"ts": 15.5, "text": "stage 2/3: deploying p to m02"},
        {"ts": 16.0, "text": "rolling back m01, m02 to q: gate latency"},
        {"ts": 16.25, "text": "all machines back on q"},
    ]
    assert _stage_times(history) == [5.5, 0.75]
    assert _rollback_s(history) == 0.25
    assert _rollback_s(history[:3]) is None
