"""The records the worker's machine stage forwards to its line stage."""

from __future__ import annotations

import pytest

from stream.line_records import LineItem, decode_line_record, encode_line_record
from stream.rules import Observation


def _obs(ts: float, **values: float) -> Observation:
    return Observation(site="s1", machine="m1", line="L1", model="seg", ts=ts, values=values, camera="c0")


def test_a_record_gives_back_the_observations_with_the_line_metrics_only() -> None:
    anomaly = Observation(site="s1", machine="m2", line="L1", model="lstm", ts=5.0, values={"anomaly_level": 1.5},
                          group="pump", channels=("v1", "t2"))
    items = [LineItem("a1", 1.0, [_obs(0.9, defect_ratio=0.1, latency_ms=6.0), _obs(1.0, defect_ratio=0.0)]),
             LineItem("a2", 5.0, [anomaly])]

    decoded = decode_line_record(encode_line_record("s1", "L1", ["anomaly_level", "defect_ratio"], items))

    assert [(item.msg_id, item.ts) for item in decoded] == [("a1", 1.0), ("a2", 5.0)]
    assert decoded[0].observations == [_obs(0.9, defect_ratio=0.1), _obs(1.0, defect_ratio=0.0)]
    assert decoded[1].observations == [anomaly]


def test_a_record_is_far_smaller_than_the_observations_as_dicts() -> None:
    import json

    items = [LineItem(f"id{i}", float(i), [_obs(i + f / 10, defect_ratio=0.01 * f, latency_ms=6.0, alarm=0.0)
                                           for f in range(3)]) for i in range(100)]
    compact = encode_line_record("s1", "L1", ["defect_ratio"], items)
    as_dicts = json.dumps({"items": [{"msg_id": item.msg_id, "ts": item.ts, "observations": [
        obs.to_dict() for obs in item.observations]} for item in items]}).encode()
    assert len(compact) < len(as_dicts) / 2


@pytest.mark.parametrize("data", [b"not json", b"{}", b'{"site": "s1", "line": "L1", "metrics": ["x"], "items": [[1]]}',
                                  b'{"site": "s1", "line": "L1", "metrics": ["x"], "items": '
                                  b'[["a", 1.0, "m1", null, null, [["seg", 1.0, [1.0, 2.0], []]]]]}'])
def test_what_is_not_a_line_record_raises_the_errors_the_worker_dead_letters(data: bytes) -> None:
    with pytest.raises((ValueError, KeyError, TypeError)):
        decode_line_record(data)
