import logging
from pathlib import Path

import numpy as np
import pytest

from edge.inference import ModelLoadError, SegmentationModel, preprocess_frame, resolve_providers, tensorrt_options
from edge.postprocess import region_mask, segmentation_metrics
from edge.synthetic import SyntheticCamera
from models.package import load_package

PACKAGES = Path(__file__).resolve().parents[3] / "models" / "packages"


@pytest.fixture(scope="module")
def package():
    return load_package(PACKAGES / "seg-synth-int8")


@pytest.fixture(scope="module")
def model(package):
    return SegmentationModel(package, threads=2)


def test_committed_package_loads_and_names_itself(model, package):
    assert (model.name, model.version) == ("seg-synth", package.manifest.version)
    assert model.providers[-1] == "CPUExecutionProvider"
    assert package.model_path.stat().st_size < 1_000_000


def test_infer_returns_probability_maps_at_frame_size(model):
    frames = [
        SyntheticCamera(1).frame(3).image,
        np.full((120, 160), 90, np.uint8),
        SyntheticCamera(2, width=200, height=100).frame(0).image,
    ]
    probs = model.infer(frames)
    assert [p.shape for p in probs] == [(240, 320), (120, 160), (100, 200)]
    assert all(p.dtype == np.float32 and p.min() >= 0 and p.max() <= 1 for p in probs)
    assert model.infer([]) == []


def test_batch_equals_one_by_one(model):
    camera = SyntheticCamera(3, defect_rate=1.0)
    frames = [camera.frame(i).image for i in (4, 30, 60)]
    batched = model.infer(frames)
    single = [model.infer([f])[0] for f in frames]
    for a, b in zip(batched, single):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_preprocess_follows_the_manifest(package):
    spec = package.manifest.preprocess
    x = preprocess_frame(np.full((240, 320, 3), 255, np.uint8), spec)
    assert x.shape == (1, spec.height, spec.width) and x.dtype == np.float32
    assert np.allclose(x, (1.0 - spec.mean) / spec.std)


def test_unavailable_providers_fall_back_to_cpu(caplog):
    with caplog.at_level(logging.WARNING, logger="edge.inference"):
        chosen = resolve_providers(["tensorrt", "nonsense", "cpu"])
    assert chosen[-1] == "CPUExecutionProvider"
    assert "nonsense" in caplog.text
    assert resolve_providers([]) == ["CPUExecutionProvider"]


def test_tensorrt_options_cache_engines_and_follow_the_package_precision(tmp_path):
    """Pure settings check: TensorRT itself needs a Jetson/NVIDIA GPU, which this box lacks."""
    int8 = tensorrt_options("int8", tmp_path)
    assert int8["trt_engine_cache_enable"] == "True" and int8["trt_engine_cache_path"] == str(tmp_path)
    assert (int8["trt_int8_enable"], int8["trt_fp16_enable"]) == ("True", "True")
    assert (tensorrt_options("fp16", tmp_path)["trt_fp16_enable"], tensorrt_options("fp32", tmp_path)["trt_fp16_enable"]) \
        == ("True", "False")


def test_wrong_task_is_refused():
    with pytest.raises(ModelLoadError, match="not segmentation"):
        SegmentationModel(load_package(PACKAGES / "anomaly-skab"))


def test_detects_defects_on_fresh_cameras(model, package):
    """The committed package, run as the edge runs it, on camera seeds never used in training."""
    post = package.manifest.postprocess
    predicted, truth = [], []
    for seed in range(20_000, 20_006):
        camera = SyntheticCamera(seed, defect_rate=0.3)
        frames = [camera.frame(11 * i + 5) for i in range(50)]
        for start in range(0, len(frames), 10):
            chunk = frames[start : start + 10]
            probs = model.infer([f.image for f in chunk])
            predicted += [region_mask(p, post.threshold, post.min_area) for p in probs]
            truth += [f.mask for f in chunk]
    metrics = segmentation_metrics(predicted, truth, post.min_area)
    print(metrics)
    assert metrics["frames_defective"] >= 80 and metrics["frames_clean"] >= 80
    assert metrics["iou"] >= 0.6
    assert metrics["recall"] >= 0.9
    assert metrics["false_alarm_rate"] <= 0.1
