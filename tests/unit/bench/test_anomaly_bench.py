"""bench.anomaly: ours and the baselines side by side on a few real SKAB and NAB files (--quick),
one JSON with every method's SKAB and NAB figures; and its cross-validation picks a threshold
factor on the other folds' files only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.anomaly import (FACTORS, OURS, SKAB_PACKAGE, Run, best_factor, cross_validate, folds_of, main,
                           nab_package_problem, run_ours_nab)
from models import nab, skab
from models.baselines import torch_missing
from models.package.series import Series
from tests.tiny_anomaly import write_tiny_anomaly_package

HAVE_DATA = (skab.skab_root() / "valve1").is_dir() and (nab.nab_root() / nab.WINDOWS_FILE).is_file()
METHODS = [OURS, "always-alarm", "rolling-z", "pca-t2q", "isolation-forest"] + ([] if torch_missing() else ["conv-ae"])


def test_folds_cover_every_file_once():
    parts = folds_of(11, 5, seed=0)
    assert len(parts) == 5 and sorted(np.concatenate(parts).tolist()) == list(range(11))
    assert [p.tolist() for p in folds_of(11, 5, seed=0)] == [p.tolist() for p in parts]  # fixed seed
    assert len(folds_of(3, 5, seed=0)) == 3


def test_cross_validation_chooses_on_the_other_folds_only():
    """The files of the first fold reward few alarms (a high factor), the others many (factor 1):
    each fold's held-out files get the factor the OTHER fold's files prefer."""
    first, second = folds_of(4, 2, seed=0)
    quiet = set(first.tolist())
    run = Run("x", [0] * 4, scores=[np.arange(2000.0)] * 4, calibration=[np.arange(10.0)] * 4)

    def objective(pairs):
        return sum(-a.sum() if i in quiet else a.sum() for i, a in pairs)

    assert best_factor(run, sorted(quiet), objective) == FACTORS[-1]
    assert best_factor(run, second.tolist(), objective) == 1.0
    alarms, chosen = cross_validate(run, objective, folds=2, seed=0)
    assert chosen == [1.0, FACTORS[-1]]
    for i in range(4):
        expected = run.alarms(i, 1.0 if i in quiet else FACTORS[-1])
        np.testing.assert_array_equal(alarms[i], expected)
    assert alarms[first[0]].sum() > alarms[second[0]].sum()


def test_ours_on_nab_streams_each_file_calibrating_on_its_probation(tmp_path: Path):
    """A univariate package runs on NAB files of two probation lengths; the 8-channel SKAB one is refused."""
    package = tmp_path / "uni"
    write_tiny_anomaly_package(package, ["value"], name="uni")
    rng = np.random.default_rng(0)
    files = []
    for i, rows in enumerate((300, 300, 500)):
        values = rng.standard_normal((rows, 1)).astype(np.float32)
        values[250:260] += 40.0  # a spike no calibration saw
        t = np.arange(rows, dtype=np.float64) * 300
        files.append(nab.NabFile(Series(Path(f"c/{i}.csv"), f"c/{i}.csv", ("value",), values, t, None, 0, 0),
                                 ((240, 270),)))
    assert nab_package_problem(package) is None
    assert "8 channels" in nab_package_problem(SKAB_PACKAGE) and "no package" in nab_package_problem(None)
    run = run_ours_nab(package, files)
    assert run.calibration_rows == [45, 45, 75] and run.rows == 1100 and run.rate > 0
    for i, f in enumerate(files):
        alarms = run.alarms(i, 1.0)
        assert alarms.shape == (len(f.values),) and not alarms[: f.probation].any()
        assert alarms[250:262].any(), f"file {i}: the 40-sigma spike raised no alarm"


def test_absent_data_skips_each_part_with_its_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("EDGELINE_DATA", str(tmp_path / "nowhere"))
    out = tmp_path / "anomaly.json"
    main(quick=True, nab_package=None, skab_package=SKAB_PACKAGE, folds=2, seed=0, out=out)
    data = json.loads(out.read_text())
    assert "SKAB data not found under" in data["skab"]["skipped"] and "rows" not in data["skab"]
    assert "NAB data not found under" in data["nab"]["skipped"] and "rows" not in data["nab"]
    assert any(note.startswith("skab skipped: ") for note in data["notes"])


@pytest.mark.skipif(not HAVE_DATA, reason=f"SKAB/NAB data not found under {skab.data_root()} (set EDGELINE_DATA)")
def test_quick_run_writes_every_method_for_skab_and_nab(tmp_path: Path):
    out = tmp_path / "anomaly.json"
    main(quick=True, nab_package=None, skab_package=SKAB_PACKAGE, folds=2, seed=0, out=out)
    data = json.loads(out.read_text())
    assert data["benchmark"] == "anomaly" and data["quick"] and "machine" in data
    skab_rows = {r["method"]: r for r in data["skab"]["rows"]}
    assert list(skab_rows) == METHODS
    for row in skab_rows.values():
        assert {"f1", "far", "mar", "free_alarmed_pct", "samples_per_s", "x_ours"} <= set(row)
        assert 0 <= row["f1"] <= 1 and 0 <= row["far"] <= 1 and 0 <= row["free_alarmed_pct"] <= 100
    assert skab_rows["always-alarm"]["far"] == 1 and skab_rows["always-alarm"]["mar"] == 0
    assert skab_rows["always-alarm"]["free_alarmed_pct"] == 100
    assert skab_rows[OURS]["x_ours"] == pytest.approx(1.0) and skab_rows["pca-t2q"]["samples_per_s"] > 0
    assert {r["folder"] for r in data["skab"]["folders"]} == {"valve1", "other"}
    nab_rows = {r["method"]: r for r in data["nab"]["rows"]}
    assert list(nab_rows) == METHODS and "no package" in nab_rows[OURS]["skipped"]
    for method in METHODS[1:]:
        row = nab_rows[method]
        assert {"target_detected_pct", "target_fp_events_per_file", "no_anomaly_files_alarmed", "nab_score",
                "nab_score_onsets"} <= set(row)
    assert nab_rows["always-alarm"]["all_detected_pct"] == 100 and nab_rows["always-alarm"]["nab_score"] < 0
    assert {c["category"] for c in data["nab"]["categories"]} == set(nab.CATEGORIES)
