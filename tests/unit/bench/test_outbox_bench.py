"""The outbox benchmark runs tiny against real agents with an unreachable broker: one row per
machine, its message rates by kind and the minutes each outbox size holds, in one JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_outbox_benchmark_writes_rates_and_minutes_held(tmp_path: Path) -> None:
    from bench.outbox import main

    out = tmp_path / "outbox.json"
    main(seconds=2.0, sizes="100000", out=out)
    grouped, demo = json.loads(out.read_text())["rows"]
    for row in (grouped, demo):
        assert row["messages_per_s"] == pytest.approx(row["results_per_s"] + row["anomalies_per_s"]
                                                      + row["other_per_s"])
        assert row["results_per_s"] > 0 and row["anomalies_per_s"] > 0 and row["payload_bytes"] > 0
        assert row["100,000: all, min"] == pytest.approx(100_000 / row["messages_per_s"] / 60)
    assert grouped["messages_per_s"] < demo["messages_per_s"]  # 1 s grouping: 1 message per camera per second
