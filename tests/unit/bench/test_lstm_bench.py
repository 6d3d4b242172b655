"""The streaming LSTM benchmark runs tiny: every method at 1, 26 and 64 groups, ratios consistent, one JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.lstm import GROUPS, PACKAGE, main


@pytest.mark.skipif(not (PACKAGE / "manifest.json").exists(), reason="no anomaly-skab package")
def test_lstm_benchmark_writes_rows_ratios_and_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lstm.json"
    main(seconds=0.3, out=out)
    result = json.loads(out.read_text())
    rows = {(row["method"], row["groups"]): row for row in result["rows"]}
    methods = {"ORT step", "edge StreamingAnomalyModel.step"}
    try:
        import torch  # noqa: F401
    except ImportError:
        assert "torch not installed" in result["notes"]
    else:
        methods.add("torch recompute w128")
    assert set(rows) == {(method, groups) for method in methods for groups in GROUPS}
    for (method, groups), row in rows.items():
        ort = rows[("ORT step", groups)]
        assert row["samples_per_s"] > 0 and row["us_per_sample"] == pytest.approx(1e6 / row["samples_per_s"])
        assert row["step_vs_ort"] == pytest.approx(row["samples_per_s"] / ort["samples_per_s"])
        if "torch recompute w128" in methods:
            base = rows[("torch recompute w128", groups)]["samples_per_s"]
            assert row["ort_vs_recompute"] == pytest.approx(ort["samples_per_s"] / base)
    assert "at 64 groups: whole step path" in result["notes"] and "ORT step's rate" in result["notes"]
    assert "edge StreamingAnomalyModel.step" in capsys.readouterr().out
