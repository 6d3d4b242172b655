"""bench.central's arithmetic: histogram quantiles over a step's bucket increments and the
py-spy summary (the end-to-end run itself needs Kafka and minutes: see the README)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.central import _quantile, summarize_profile


def test_quantiles_come_from_the_step_increments_only():
    before = {0.1: 50.0, 0.2: 80.0, float("inf"): 100.0}  # what earlier steps left in the histogram
    after = {0.1: 50.0, 0.2: 130.0, float("inf"): 150.0}  # this step: 50 in (0.1, 0.2], none faster
    assert _quantile(before, after, 0.5) == pytest.approx(150.0)  # halfway through (0.1, 0.2] s
    assert _quantile(before, after, 0.99) == pytest.approx(199.0)  # linear inside the bucket
    assert math.isnan(_quantile(after, after, 0.5))  # nothing observed in the step


def test_profile_summary_shares_by_innermost_frame(tmp_path: Path):
    raw = tmp_path / "worker.txt"
    raw.write_text("main (app.py:1);evaluate (/x/stream/rules.py:10) 30\n"
                   "main (app.py:1);write (/y/site-packages/aiokafka/conn.py:5) 10\n")
    assert summarize_profile(raw) == [("evaluate [/x/stream/rules.py]", 75.0), ("write [aiokafka]", 25.0)]
