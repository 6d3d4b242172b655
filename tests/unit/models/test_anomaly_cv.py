from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from models import anomaly_cv, skab
from models.anomaly_cv import FREE_FOLDER, Objective, cross_validate, cv_files, stratified_folds
from models.package import load_package
from stream.console import print_table
from tests.unit.models.test_skab import write_csv

PACKAGE = Path(__file__).resolve().parents[3] / "models" / "packages" / "anomaly-skab"
GRID = [{"level_weight": 1.0, "threshold_factor": f} for f in (1.0, 2.0, 6.0)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("skab")
    write_csv(root / "anomaly-free" / "anomaly-free.csv", 2400, 10, labels=False)
    for i in range(4):
        write_csv(root / "valve1" / f"{i}.csv", 700, 11 + i, anomaly=(500, 620))
    for i in range(2):
        write_csv(root / "other" / f"{i}.csv", 650, 21 + i, anomaly=(450, 560))
    return root


@pytest.fixture(scope="module")
def package():
    return load_package(PACKAGE)


def test_folds_are_disjoint_cover_every_file_and_are_stratified_by_folder():
    folders = ["a"] * 10 + ["b"] * 16 + ["c"] * 5
    folds = stratified_folds(folders, 5, seed=3)
    every = np.concatenate(folds)
    assert sorted(every.tolist()) == list(range(len(folders)))  # disjoint and complete
    for folder, total in Counter(folders).items():
        per_fold = [sum(folders[i] == folder for i in f) for f in folds]
        assert max(per_fold) - min(per_fold) <= 1 and sum(per_fold) == total
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    assert [f.tolist() for f in folds] == [f.tolist() for f in stratified_folds(folders, 5, seed=3)]
    assert [f.tolist() for f in folds] != [f.tolist() for f in stratified_folds(folders, 5, seed=4)]


def test_the_objective_respects_the_false_alarm_limits_before_f1():
    # setting 0: F1 high but FAR 0.5; setting 1: lower F1 within FAR; per file (tp, fp, tn, fn); file 2 anomaly-free
    counts = np.array([[[90, 50, 50, 10], [90, 50, 50, 10], [0, 0, 100, 0]],
                       [[60, 5, 95, 40], [60, 5, 95, 40], [0, 0, 100, 0]],
                       [[80, 5, 95, 20], [80, 5, 95, 20], [0, 50, 50, 0]]])
    is_free = np.array([False, False, True])
    assert Objective(far_max=0.1, free_max=0.01).choose(counts, is_free, np.arange(3)) == 1
    assert Objective(far_max=0.6, free_max=0.01).choose(counts, is_free, np.arange(3)) == 0
    assert Objective(far_max=0.1, free_max=0.6).choose(counts, is_free, np.arange(3)) == 2
    # nothing feasible: the least excess over the limits
    assert Objective(far_max=0.0, free_max=0.0).choose(counts, is_free, np.arange(3)) == 1


def test_anomaly_free_recordings_become_unlabelled_chunks_of_their_own_folder(root):
    files = cv_files(root, chunks=4)
    free = [f for f in files if f.folder == FREE_FOLDER]
    assert len(free) == 4 and sum(len(f.values) for f in free) == 2400
    assert all(not f.labels.any() for f in free)
    assert len(files) == 4 + 6


def test_cross_validation_through_the_runtime_chooses_on_training_files_only(root, package):
    files = cv_files(root, chunks=2)
    report = cross_validate(package, files, GRID, folds=2, seed=0)
    assert report.counts.shape == (len(GRID), len(files), 4)
    rows = report.counts.sum(-1)
    assert (rows == rows[0]).all()  # every setting scores the same rows
    assert rows[0, 0] == len(files[0].values) - skab.PROTOCOL_STEPS
    # a held-out file's labels never influence its fold's choice: flip them all and choose again
    test = report.folds[0]
    target = int(next(i for i in test if files[i].folder != FREE_FOLDER))
    flipped = list(files)
    flipped[target] = replace(files[target], labels=~files[target].labels)
    again = cross_validate(package, flipped, GRID, folds=2, seed=0)
    assert again.chosen[0] == report.chosen[0]
    assert not np.array_equal(again.held_out()[target], report.held_out()[target])  # its own score did change
    # held-out counts are the counts of the setting chosen without the file
    for fold, s in zip(report.folds, report.chosen):
        np.testing.assert_array_equal(report.held_out()[fold], report.counts[s, fold])
    pooled = report.pooled()
    assert {"f1", "far", "mar", "free_share", "fold_f1_mean", "fold_f1_std"} <= set(pooled)
    assert report.final in GRID


def test_report_tables_and_json_name_every_fold_and_folder(root, package):
    report = cross_validate(package, cv_files(root, chunks=2), GRID, folds=2)
    data = report.as_json()
    assert [f["fold"] for f in data["folds"]] == [0, 1]
    assert set(data["per_folder"]) == {"anomaly-free", "other", "valve1"}
    console = Console(record=True, width=200)
    for table in report.tables():
        print_table(table, console)
    text = console.export_text()
    assert "POOLED (CV)" in text and "valve1" in text and "threshold_factor" in text


def test_fast_start_is_chosen_on_tuning_pumps_and_reported_on_others(package, monkeypatch):
    seen = []
    real = anomaly_cv.pump_figures

    def spy(pkg, profile, seeds, *args, **kwargs):
        seen.append(tuple(seeds))
        return real(pkg, profile, seeds, *args, **kwargs)

    monkeypatch.setattr(anomaly_cv, "pump_figures", spy)
    budgets = [{"calibration_steps": 80.0, "max_false_alarms_per_day": b} for b in (0.01, 10.0)]
    margin = [{"calibration_steps": 80.0, "threshold_factor": 2.0, "max_false_alarms_per_day": None}]
    assert package.manifest.postprocess.max_false_alarms_per_day is not None  # the margin candidate unsets it
    fast = anomaly_cv.tune_fast_start(package, budgets + margin, samples=800)
    rates = len(anomaly_cv.FAST_RATES)
    assert seen[: 3 * rates] == [anomaly_cv.TUNE_SEEDS] * 3 * rates
    assert seen[3 * rates :] == [anomaly_cv.REPORT_SEEDS] * rates
    assert [s for s, _ in fast.grid] == budgets + margin
    assert not set(anomaly_cv.TUNE_SEEDS) & set(anomaly_cv.REPORT_SEEDS)
    assert fast.chosen in budgets + margin and set(fast.report) == set(anomaly_cv.FAST_RATES)
    assert {"synth_10hz_episodes", "synth_20hz_detected", "synth_10hz_false_events", "synth_20hz_quiet_pump_events",
            "synth_10hz_event_f1"} <= set(fast.metrics())


def test_a_held_out_file_that_would_change_the_choice_does_not_change_its_folds(root, package, monkeypatch):
    """Setting 1 is best on every file but one, where setting 0 wins by so much that it wins the pool."""
    files = cv_files(root, chunks=2)
    folds = stratified_folds([f.folder for f in files], 2, seed=0)
    heavy = int(next(i for i in folds[0] if files[i].folder != FREE_FOLDER))
    counts = np.zeros((2, len(files), 4), np.int64)
    counts[:, :] = [0, 0, 100, 0]  # anomaly-free chunks: quiet under both
    for i, f in enumerate(files):
        if f.folder != FREE_FOLDER:
            counts[0, i], counts[1, i] = [50, 5, 95, 50], [60, 5, 95, 40]
    counts[0, heavy], counts[1, heavy] = [5000, 5, 9995, 0], [0, 5, 9995, 5000]
    monkeypatch.setattr(anomaly_cv, "score_grid", lambda *args, **kwargs: counts)
    report = cross_validate(package, files, GRID[:2], folds=2, seed=0)
    assert report.final == GRID[0]  # with the heavy file in the pool, setting 0 wins
    assert report.chosen[0] == 1  # its own fold chose without it
    assert report.chosen[1] == 0  # the other fold trained on it


NAB_PACKAGE = PACKAGE.parent / "anomaly-nab"


def nab_file(category: str, index: int, window: tuple[int, int] | None):
    """A univariate NAB-like file: a daily-ish cycle plus noise; inside the window a 10-sigma jump."""
    from models.nab import NabFile
    from models.package.series import Series

    rng, t = np.random.default_rng(index), np.arange(1200)
    values = (10 + np.sin(2 * np.pi * t / 288) + 0.1 * rng.standard_normal(1200)).astype(np.float32)
    if window:
        values[window[0] : window[1]] += 1.0
    name = f"{category}/f{index}.csv"
    series = Series(Path(name), name, ("value",), values[:, None], t * 300.0, None, 0, 0)
    return NabFile(series, (window,) if window else ())


@pytest.mark.skipif(not NAB_PACKAGE.is_dir(), reason="no shipped anomaly-nab package")
def test_nab_cross_validation_scores_held_out_files_with_the_training_choice():
    files = [nab_file("realKnownCause", i, (700, 760)) for i in range(3)]
    files += [nab_file("realAWSCloudwatch", 3 + i, (800, 850)) for i in range(3)]
    files += [nab_file("artificialNoAnomaly", 6 + i, None) for i in range(2)]
    grid = [{"level_weight": 1.0, "max_false_alarms_per_day": b} for b in (0.001, 1000.0)]
    report = anomaly_cv.cross_validate_nab(load_package(NAB_PACKAGE), files, grid, folds=2)
    assert report["final"] in grid and len(report["folds"]) == 2
    held = sorted(name for fold in report["folds"] for name in fold["held_out"])
    assert held == sorted(f.name for f in files)
    pooled = report["pooled"]
    assert 0 <= pooled["detected_share"] <= 1 and pooled["quiet_files"] == 2
    assert pooled["detected_share"] > 0.5  # a 10-sigma jump


@pytest.mark.skipif(not NAB_PACKAGE.is_dir(), reason="no shipped anomaly-nab package")
def test_the_shipped_nab_package_is_univariate_and_records_its_cross_validation():
    import json

    package = load_package(NAB_PACKAGE)
    assert package.manifest.preprocess.channels == ["value"]
    assert {"cv_nab_detected_share", "cv_nab_fp_events_per_file", "cv_nab_quiet_files_alarmed"} <= set(
        package.manifest.metrics)
    training = json.loads((NAB_PACKAGE / "training.json").read_text())
    assert training["cross_validation"]["pooled"]["detected_share"] == pytest.approx(
        package.manifest.metrics["cv_nab_detected_share"])
    post = package.manifest.postprocess.model_dump()
    assert all(post[k] == pytest.approx(v) for k, v in training["cross_validation"]["final"].items())


def test_cli_prints_the_tables_and_writes_json(root, monkeypatch, tmp_path):
    from typer.testing import CliRunner
    import typer
    import json

    monkeypatch.setattr(anomaly_cv, "GRID", GRID)
    app = typer.Typer()
    app.command()(anomaly_cv.main)
    out = tmp_path / "cv.json"
    result = CliRunner().invoke(app, ["--data", str(root), "--package", str(PACKAGE), "--folds", "2", "--json", str(out)],
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "POOLED (CV)" in result.output and "anomaly-free.csv alarmed" in result.output
    data = json.loads(out.read_text())
    assert data["final"] in GRID and 0 <= data["anomaly_free_alarm_share"] <= 1


def test_fast_start_prefers_no_false_alarm_events_over_more_detections():
    quiet = {"detected": 90.0, "false_events": 0.0, "quiet_pump_events": 0.0}
    loud = {"detected": 120.0, "false_events": 1.0, "quiet_pump_events": 2.0}
    sharper = {"detected": 100.0, "false_events": 0.0, "quiet_pump_events": 0.0}
    assert max([quiet, loud, sharper], key=anomaly_cv.fast_key) is sharper
    assert anomaly_cv.fast_key(quiet) > anomaly_cv.fast_key(loud)
