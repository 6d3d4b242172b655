import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edge.anomaly import StreamingAnomalyModel  # noqa: E402
from edge.inference import SegmentationModel  # noqa: E402
from edge.synthetic import SyntheticCamera, pump_dataset  # noqa: E402
from models import quickstart  # noqa: E402
from models.package import load_package  # noqa: E402

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("packages")
    packages = quickstart.train_all(out, seed=3, budget=quickstart.TINY_BUDGET, progress=False)
    return out, packages


def test_tiny_run_writes_loadable_verified_packages(trained):
    out, packages = trained
    assert set(packages) == {"seg-synth", "anomaly-synth"}
    for name in packages:
        package = load_package(out / name)
        assert package.manifest.name == name and package.manifest.task in ("segmentation", "anomaly")
        assert package.model_path.stat().st_size < 1_000_000
        metrics = package.manifest.metrics
        assert metrics["onnx_parity_max_abs_diff"] < 1e-4
        assert "train_seconds" in metrics and package.manifest.bench
    assert "fresh_iou" in packages["seg-synth"].manifest.metrics
    assert "fresh_event_f1" in packages["anomaly-synth"].manifest.metrics


def test_exported_segmentation_matches_torch_at_any_batch(trained):
    out, _ = trained
    model = quickstart.TinyUNet().eval()
    package = load_package(out / "seg-synth")
    runtime = SegmentationModel(package)
    spec = package.manifest.preprocess
    frames = [SyntheticCamera(9, defect_rate=1.0).frame(i).image for i in (3, 33)]
    # same architecture, fresh weights: export and compare through the edge runtime
    exported = quickstart.export_segmentation(model)
    pkg2 = quickstart.write_package(out / "seg-check", quickstart.seg_manifest(1, 1.0), exported)
    probs = SegmentationModel(pkg2).infer(frames)
    x = torch.from_numpy(np.stack([quickstart.preprocess_frame(f, spec) for f in frames]))
    with torch.no_grad():
        ref = model(x).numpy()[:, 0]
    for p, r in zip(probs, ref):
        np.testing.assert_allclose(p, cv2.resize(r, (p.shape[1], p.shape[0]), interpolation=cv2.INTER_LINEAR), atol=1e-4)
    assert runtime.infer(frames)[0].shape == frames[0].shape[:2]


def test_streaming_runtime_matches_torch_full_sequence(trained):
    """Edge step-by-step state carrying equals torch running the LSTM over the whole sequence."""
    out, _ = trained
    torch.manual_seed(0)
    forecaster = quickstart.Forecaster().eval()
    values = np.stack([pump_dataset(s, 60, anomaly_rate=0.1)[0] for s in (1, 2, 3)])
    mean, std = values.reshape(-1, 8).mean(0), values.reshape(-1, 8).std(0)
    post = quickstart.AnomalyPostprocess(residual_scale=[0.5] * 8, threshold=3.0, ema_alpha=0.3, warmup_steps=5)
    manifest = quickstart.anomaly_manifest(forecaster, mean, std, post)
    package = quickstart.write_package(out / "anomaly-check", manifest, quickstart.export_forecaster(forecaster))
    residuals = quickstart.forecast_residuals(forecaster, ((values - mean) / std).astype(np.float32))
    expected = quickstart.stream_scores(residuals, np.full(8, 0.5), 0.3)
    runtime = StreamingAnomalyModel(package)
    got = np.zeros((3, 60))
    for t in range(60):
        scores = runtime.step({f"g{g}": values[g, t] for g in range(3)})
        got[:, t] = [scores[f"g{g}"].score for g in range(3)]
    assert np.all(got[:, 0] == 0)
    np.testing.assert_allclose(got[:, 1:], expected, rtol=1e-4, atol=1e-4)
