"""The inference benchmark runs end to end and writes a table with its in-run baseline."""

from __future__ import annotations

import json
from pathlib import Path

from bench.inference import main


def test_benchmark_writes_rows_against_the_batch1_baseline(tmp_path: Path) -> None:
    out = tmp_path / "inference.json"
    main(seconds=0.2, out=out)
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [row["batch"] for row in rows] == [1, 2, 4, 8]
    assert rows[0]["speedup_vs_batch1"] == 1.0
    assert all(row["frames_per_s"] > 0 for row in rows)
    assert result["machine"]["cores"] >= 1


def test_cameras_of_two_sizes_take_turns_through_a_native_package(tmp_path: Path) -> None:
    from bench.inference import camera_frames
    from tests.tiny_segmentation import write_dark_block_package

    assert [f.shape[:2] for f in camera_frames([(64, 48), (90, 61)], count=4)] == [(48, 64), (61, 90)] * 2
    package = write_dark_block_package(tmp_path / "native")
    out = tmp_path / "inference.json"
    main(seconds=0.1, package=str(package.folder), sizes="64x48,90x61", out=out)
    rows = json.loads(out.read_text())["rows"]
    assert [row["batch"] for row in rows] == [1, 2, 4, 8] and all(row["frames_per_s"] > 0 for row in rows)
