"""The edge benchmark runs tiny end to end against a real Mosquitto: an agent row and a naive
row per camera count, with latencies and the ratio, in one JSON."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import service_unavailable

pytest.importorskip("torch")


def test_edge_benchmark_writes_agent_and_naive_rows(tmp_path: Path) -> None:
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        service_unavailable("mosquitto not installed")
    from bench.edge import main

    out = tmp_path / "edge.json"
    main(seconds=1.5, cameras="2", fps=10, out=out)
    rows = json.loads(out.read_text())["rows"]
    assert [row["pipeline"] for row in rows] == ["agent", "naive"]
    agent, naive = rows
    assert agent["offered_fps"] == 20 and 0 < agent["inferred_fps"] <= 25
    assert 0 < agent["p50_ms"] <= agent["p99_ms"]
    assert agent["vs_naive"] == pytest.approx(agent["inferred_fps"] / naive["inferred_fps"])
