import json
from dataclasses import replace

import numpy as np
import pytest

from edge.anomaly import StreamingAnomalyModel
from edge.synthetic import SyntheticPump
from tests.unit.models.test_skab import write_csv

torch = pytest.importorskip("torch")

from models.anomaly import (
    TINY_RECIPE,
    Forecaster,
    build_anomaly_package,
    export_step,
    reference_stream,
    step_parity,
)

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A SKAB-like folder: an anomaly-free recording and two labelled files."""
    root = tmp_path_factory.mktemp("skab")
    write_csv(root / "anomaly-free" / "anomaly-free.csv", 900, 10, labels=False)
    write_csv(root / "valve1" / "0.csv", 700, 11, anomaly=(500, 620))
    write_csv(root / "other" / "1.csv", 650, 12, anomaly=(450, 560))
    return root


@pytest.fixture(scope="module")
def built(tiny_data, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("packages")
    return build_anomaly_package(out, progress=False, recipe=TINY_RECIPE, data=tiny_data)


def test_training_smoke_run_writes_a_complete_package(built):
    manifest = json.loads((built.folder / "manifest.json").read_text())
    assert manifest["name"] == "anomaly-skab" and manifest["version"] == "1.0.0" and manifest["signature"] is None
    assert [i["name"] for i in manifest["inputs"]] == ["x", "h", "c"]
    assert manifest["preprocess"]["difference"] is True
    assert manifest["postprocess"]["calibration_steps"] == 400
    assert "fast-start" in manifest["postprocess"]["profiles"]
    metrics = built.manifest.metrics
    for key in ("skab_pooled_f1", "skab_valve1_f1", "skab_other_far", "skab_pooled_mar", "onnx_parity_max_abs_diff",
                "synth_event_f1", "train_seconds", "params"):
        assert key in metrics
    assert metrics["onnx_parity_max_abs_diff"] < 1e-4
    assert built.manifest.bench["us_per_sample_batch64"] > 0


def test_step_export_matches_torch_full_sequence_for_batched_groups(tmp_path):
    torch.manual_seed(0)
    model = Forecaster().eval()
    path = tmp_path / "step.onnx"
    path.write_bytes(export_step(model))
    assert step_parity(model, path, steps=40, groups=7) < 1e-5


def test_streaming_on_onnx_runtime_equals_the_full_sequence_torch_reference(built, tmp_path):
    """Same package weights: torch runs the whole sequence at once, the edge runs ONNX step by step."""
    torch.manual_seed(1)
    model = Forecaster().eval()
    folder = tmp_path / "pkg"
    from models.package import write_package

    package = write_package(folder, built.manifest, export_step(model))
    post = package.manifest.postprocess
    values, _ = SyntheticPump(8, anomaly_rate=0.05).generate(420)
    values[300:330, 2] += 0.3
    want_scores, want_alarms = reference_stream(model, post, values, calibration_steps=150)
    edge = StreamingAnomalyModel(package, calibration_steps=150)
    got = [edge.step({"g": v})["g"] for v in values]
    np.testing.assert_allclose([s.score for s in got], want_scores, rtol=1e-4, atol=1e-5)
    threshold = edge.group_threshold("g")
    clear = np.abs(want_scores - threshold) > 1e-3 * threshold
    assert np.array_equal(np.array([s.is_anomaly for s in got])[clear], want_alarms[clear])
    assert want_alarms.any()
    # and several groups batched give the same as the one above
    other, _ = SyntheticPump(9, anomaly_rate=0.05).generate(420)
    together = StreamingAnomalyModel(package, calibration_steps=150)
    batched = [together.step({"g": v, "h": w})["g"] for v, w in zip(values, other)]
    np.testing.assert_allclose([s.score for s in batched], [s.score for s in got], rtol=1e-5, atol=1e-6)


def test_reference_refuses_streams_shorter_than_calibration():
    post = replace(TINY_RECIPE).postprocess(np.ones(8), 1.0)
    with pytest.raises(ValueError):
        reference_stream(Forecaster().eval(), post, np.zeros((100, 8), np.float32))
