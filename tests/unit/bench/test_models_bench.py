"""The models benchmark runs tiny end to end: seg rows for every runtime at batch 1 and 4, one JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeline.config import BUILTIN_PACKAGES

pytestmark = pytest.mark.skipif(not (BUILTIN_PACKAGES / "seg-tiles-fp32").exists(),
                                reason="no seg-tiles packages (run: edgeline models train-seg)")


def test_models_benchmark_writes_one_json(tmp_path: Path) -> None:
    from bench.models import main

    out = tmp_path / "models.json"
    main(seconds=0.05, out=out)
    result = json.loads(out.read_text())
    rows = result["rows"]
    runtimes = {row["runtime"] for row in rows}
    assert {"ORT fp32", "ORT int8 U8S8", "ORT int8 S8S8"} <= runtimes
    assert {row["batch"] for row in rows} == {1, 4}
    assert all(row["ms_per_frame"] > 0 and row["pct_of_matmul_peak"] > 0 for row in rows)
    assert "matmul fp32 peak" in result["notes"]
    assert "lstm_rows" in result
