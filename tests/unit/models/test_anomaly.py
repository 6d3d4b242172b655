import json
from pathlib import Path

import numpy as np
import pytest

from models.package.anomaly import StreamingAnomalyModel
from models.package import load_package
from models.package.series import Series
from tests.unit.models.test_skab import write_csv

torch = pytest.importorskip("torch")

from models import anomaly  # noqa: E402
from models.anomaly import (  # noqa: E402
    MAX_WINDOWS,
    TINY_RECIPE,
    AnomalyBuildError,
    Forecaster,
    build_anomaly_package,
    build_skab_package,
    export_step,
    fill_missing,
    make_windows,
    series_sha256,
    step_parity,
)

pytestmark = pytest.mark.models
SHIPPED = Path(__file__).resolve().parents[3] / "models" / "packages" / "anomaly-skab"
CHANNELS = ("flow", "speed", "temp")


def pump3(n: int, seed: int, anomaly: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A 3-channel machine: two oscillations and a slow level, noise; an anomaly shifts `speed` by 20 sigma."""
    rng, t = np.random.default_rng(seed), np.arange(n)
    values = np.stack([np.sin(t / 20), 0.5 * np.cos(t / 7), 10 + t / n], 1) + 0.05 * rng.standard_normal((n, 3))
    labels = np.zeros(n, bool)
    if anomaly:
        values[anomaly[0] : anomaly[1], 1] += 1.0
        labels[anomaly[0] : anomaly[1]] = True
    return values.astype(np.float32), labels


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    """The generic build on a non-SKAB 3-channel machine, with a missing value in its normal data."""
    torch.set_num_threads(1)
    normal = [pump3(1200, seed)[0] for seed in range(3)]
    normal[0][5, 1] = np.nan
    labelled = []
    for i in range(2):
        values, labels = pump3(900, 10 + i, (600, 700))
        labelled.append(Series(Path(f"{i}.csv"), f"test/{i}.csv", CHANNELS, values, None, labels, 0, 0))
    out = tmp_path_factory.mktemp("pkg")
    package = build_anomaly_package(normal, CHANNELS, "tiny3", "0.1.0", out, TINY_RECIPE, evaluate=labelled,
                                    postprocess={"level_weight": 1.0, "level_alpha": 0.2, "threshold_factor": 2.0},
                                    progress=False)
    return package, normal


def test_generic_build_packages_any_channels_with_parity_evaluation_and_training_record(tiny3):
    package, normal = tiny3
    again = load_package(package.folder)  # every listed file (model.onnx, training.json) matches its sha256
    manifest = again.manifest
    assert manifest.name == "tiny3" and manifest.signature is None
    assert manifest.preprocess.channels == list(CHANNELS) and manifest.inputs[0].shape == ["batch", 3]
    assert set(manifest.files) == {"model.onnx", "training.json"}
    assert manifest.postprocess.level_weight == 1.0 and manifest.postprocess.threshold_factor == 2.0
    metrics = manifest.metrics
    assert metrics["onnx_parity_max_abs_diff"] < anomaly.PARITY_TOLERANCE
    assert metrics["train_rows"] == 3600 and metrics["train_series"] == 3
    assert 0 <= metrics["eval_pooled_f1"] <= 1 and "eval_test_far" in metrics
    training = json.loads((package.folder / "training.json").read_text())
    assert training["recipe"]["steps"] == TINY_RECIPE.steps and training["channels"] == list(CHANNELS)
    assert training["data_sha256"] == series_sha256([fill_missing(v) for v in normal])
    assert manifest.bench["us_per_sample_batch64"] > 0


def test_a_generic_package_streams_three_channels_on_the_edge_runtime(tiny3):
    package, _ = tiny3
    model = StreamingAnomalyModel(package)
    values, _ = pump3(700, 20, (550, 650))
    results = [model.step({"m1": v})["m1"] for v in values]
    assert set(results[-1].channel_scores) == set(CHANNELS)
    assert not any(r.is_anomaly for r in results[:400])  # calibrating
    assert any(r.is_anomaly for r in results[550:660])  # a 20-sigma shift of one channel


def test_a_graph_that_disagrees_with_torch_is_not_packaged(tmp_path, monkeypatch):
    monkeypatch.setattr(anomaly, "step_parity", lambda model, path: 0.5)
    with pytest.raises(AnomalyBuildError, match="differs from torch"):
        build_anomaly_package([pump3(800, 0)[0]], CHANNELS, "bad", "0", tmp_path, TINY_RECIPE, progress=False)


@pytest.mark.parametrize("channels", [1, 64])
def test_step_export_matches_torch_full_sequence_for_any_channel_count(tmp_path, channels):
    torch.manual_seed(0)
    model = Forecaster(channels).eval()
    path = tmp_path / "step.onnx"
    path.write_bytes(export_step(model))
    assert step_parity(model, path, steps=40, groups=7) < 1e-5


def test_missing_values_are_forward_filled_and_an_empty_channel_is_refused():
    values = np.array([[np.nan, 1.0], [2.0, np.nan], [np.nan, np.nan], [5.0, 3.0]], np.float32)
    np.testing.assert_array_equal(fill_missing(values), [[2, 1], [2, 1], [2, 1], [5, 3]])
    with pytest.raises(AnomalyBuildError, match="no value at all"):
        fill_missing(np.array([[1.0, np.nan], [2.0, np.nan]]))


def test_bad_channel_sets_and_shapes_are_refused(tmp_path):
    with pytest.raises(AnomalyBuildError, match="1 to 64"):
        build_anomaly_package([np.zeros((500, 65))], [f"c{i}" for i in range(65)], "x", "0", tmp_path, TINY_RECIPE)
    with pytest.raises(AnomalyBuildError, match=r"expected \[T, 3\]"):
        build_anomaly_package([np.zeros((500, 2))], CHANNELS, "x", "0", tmp_path, TINY_RECIPE)
    with pytest.raises(AnomalyBuildError, match="longer than"):
        build_anomaly_package([np.zeros((100, 3))], CHANNELS, "x", "0", tmp_path, TINY_RECIPE)


def test_training_windows_are_capped_on_long_recordings():
    windows = make_windows([np.random.default_rng(0).normal(size=(100_000, 2)).astype(np.float32)], TINY_RECIPE)
    assert len(windows) <= MAX_WINDOWS and windows.shape[1:] == (TINY_RECIPE.window, 2)


def test_skab_build_is_the_generic_build_plus_cross_validated_settings(tmp_path):
    """A SKAB-like folder: the build picks its postprocess by CV and records the CV figures."""
    root = tmp_path / "skab"
    write_csv(root / "anomaly-free" / "anomaly-free.csv", 2500, 10, labels=False)
    for i in range(3):
        write_csv(root / "valve1" / f"{i}.csv", 700, 11 + i, anomaly=(500, 620))
        write_csv(root / "other" / f"{i}.csv", 650, 21 + i, anomaly=(450, 560))
    grid = [{"level_weight": 1.0, "level_alpha": 0.2, "threshold_factor": f} for f in (1.5, 3.0)]
    fast = [{"calibration_steps": 80.0, "threshold_factor": 2.0}]
    package = build_skab_package(tmp_path / "out", progress=False, recipe=TINY_RECIPE, data=root, grid=grid,
                                 folds=2, fast_grid=fast, pump_samples=600)
    metrics = package.manifest.metrics
    for key in ("cv_f1", "cv_far", "cv_mar", "cv_free_share", "cv_fold_f1_mean", "eval_pooled_f1",
                "anomaly_free_alarm_share", "synth_10hz_episodes", "synth_20hz_detected", "synth_10hz_quiet_pump_events"):
        assert key in metrics, key
    training = json.loads((package.folder / "training.json").read_text())
    final = training["cross_validation"]["final"]
    assert final in grid and package.manifest.postprocess.threshold_factor == final["threshold_factor"]
    assert package.manifest.postprocess.profiles["fast-start"] == fast[0]
    assert len(training["cross_validation"]["folds"]) == 2


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="no shipped anomaly-skab package")
def test_the_shipped_package_records_its_cross_validation_recipe_and_data_hash():
    package = load_package(SHIPPED)
    metrics = package.manifest.metrics
    for key in ("cv_f1", "cv_far", "cv_mar", "cv_free_share", "anomaly_free_alarm_share", "eval_pooled_f1"):
        assert key in metrics, key
    training = json.loads((SHIPPED / "training.json").read_text())
    assert len(training["data_sha256"]) == 64 and training["recipe"]["hidden"] == package.manifest.preprocess.hidden_size
    cv = training["cross_validation"]
    assert cv["pooled"]["f1"] == pytest.approx(metrics["cv_f1"])
    post = package.manifest.postprocess.model_dump()
    assert all(post[k] == pytest.approx(v) for k, v in cv["final"].items())
    assert "fast-start" in package.manifest.postprocess.profiles


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="no shipped anomaly-skab package")
def test_new_packages_default_to_the_setting_cross_validation_chose_for_anomaly_skab():
    post = load_package(SHIPPED).manifest.postprocess.model_dump()
    assert all(post[k] == pytest.approx(v) for k, v in anomaly.DEFAULT_POSTPROCESS.items())


def test_a_calibration_override_also_sets_how_training_windows_are_normalised(tmp_path):
    package = build_anomaly_package([pump3(900, 0)[0]], CHANNELS, "short", "0", tmp_path, TINY_RECIPE,
                                    postprocess={"calibration_steps": 120}, progress=False)
    assert package.manifest.postprocess.calibration_steps == 120
    training = json.loads((package.folder / "training.json").read_text())
    assert training["recipe"]["calibration_steps"] == 120
