import logging

import numpy as np
import pytest

from models.package.evaluation import segmentation_metrics
from models.package.files import load_package, write_package
from models.package.manifest import MODEL_FILE, PackageError, TensorSpec
from models.package.postprocess import region_mask
from models.package.preprocess import input_size, native_buckets, preprocess_frame
from models.package.session import (ModelLoadError, SegmentationModel, check_model_graph, resolve_providers,
                                    tensorrt_options)
from models.package.signing import BUILTIN_PACKAGES as PACKAGES
from models.package.synthetic import SyntheticCamera
from tests.tiny_segmentation import surface, write_dark_block_package
from tests.unit.models.package.test_files import seg_manifest


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
    with caplog.at_level(logging.WARNING, logger="models.package.session"):
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


# ------------------------------------------------------------------ native packages
# The dark-block graph (tests/tiny_segmentation.py) has total stride 4: its answer for every pixel
# is known, so these tests check values, not just shapes.


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    return SegmentationModel(write_dark_block_package(tmp_path_factory.mktemp("native") / "pkg"))


def defect_mask(rows: slice, cols: slice, size: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(size, bool)
    mask[rows, cols] = True
    return mask


def test_native_maps_come_back_at_each_frames_own_size(native):
    frames = [surface(37, 53), surface(48, 64, color=True), surface(3, 5), surface(1, 1), surface(90, 30)]
    probs = native.infer(frames)
    assert [p.shape for p in probs] == [(37, 53), (48, 64), (3, 5), (1, 1), (90, 30)]
    assert all(p.dtype == np.float32 and p.max() < 0.01 for p in probs)  # bright everywhere: no defect
    assert preprocess_frame(frames[0], native.spec).shape == (1, 37, 53)  # own size, aspect kept, not padded yet


def test_native_finds_a_dark_block_where_it_is(native):
    rows, cols = slice(8, 16), slice(12, 24)
    prob = native.infer([surface(48, 64, (rows, cols))])[0]
    np.testing.assert_array_equal(prob > 0.5, defect_mask(rows, cols, (48, 64)))


def test_native_frames_of_different_sizes_batch_as_they_run_alone(native):
    """37x53 and 39x55 share the 40x56 bucket (each cropped back from its own padding), 48x64 is
    alone in its bucket, 8x8 in a third; one infer() call must give what each frame gives alone."""
    frames = [surface(37, 53, (slice(4, 12), slice(8, 16))), surface(48, 64, (slice(20, 28), slice(0, 8))),
              surface(39, 55, (slice(32, 39), slice(44, 55))), surface(8, 8, (slice(0, 4), slice(4, 8))),
              surface(37, 53, (slice(28, 37), slice(0, 12)), color=True)]
    assert native_buckets([preprocess_frame(f, native.spec) for f in frames], native.spec.pad_multiple) == {
        (40, 56): [0, 2, 4], (48, 64): [1], (8, 8): [3]}
    batched = native.infer(frames)
    alone = [native.infer([f])[0] for f in frames]
    for a, b, frame in zip(batched, alone, frames):
        assert a.shape == frame.shape[:2]
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_array_equal(batched[1] > 0.5, defect_mask(slice(20, 28), slice(0, 8), (48, 64)))


def test_native_padding_mirrors_the_frame_instead_of_darkening_its_border(native):
    """37x53 pads to 40x56: the last block row and column hold 1 frame pixel and 3 of padding. Zeros
    there would read as a dark defect along the bottom and right edges; the mirror keeps them bright,
    and keeps a dark corner dark."""
    bright = native.infer([surface(37, 53)])[0]
    assert bright.max() < 0.01
    rows, cols = slice(32, 37), slice(48, 53)
    corner = native.infer([surface(37, 53, (rows, cols))])[0]
    np.testing.assert_array_equal(corner > 0.5, defect_mask(rows, cols, (37, 53)))


def test_native_max_side_downscales_and_answers_at_frame_size(tmp_path):
    model = SegmentationModel(write_dark_block_package(tmp_path / "pkg", max_side=60))
    assert input_size((40, 120), model.spec) == (20, 60) and input_size((30, 50), model.spec) == (30, 50)
    frame = surface(40, 120, (slice(16, 32), slice(48, 80)))
    assert preprocess_frame(frame, model.spec).shape == (1, 20, 60)
    prob = model.infer([frame])[0]
    assert prob.shape == (40, 120)
    assert prob[18:30, 50:78].min() > 0.9  # the block, upscaled back (its edges are interpolated)
    assert prob[:12].max() < 0.01 and prob[:, :44].max() < 0.01 and prob[:, 84:].max() < 0.01


def test_native_package_with_a_fixed_size_graph_is_refused(tmp_path):
    """A graph exported without dynamic height/width would pass the warm-up at the reference size and
    fail on the first camera of another size: refused at load instead."""
    package = write_dark_block_package(tmp_path / "pkg", dynamic=False)
    with pytest.raises(ModelLoadError, match="dynamic height and width"):
        SegmentationModel(package)


def test_the_graph_must_load_and_match_the_manifest(tmp_path):
    real = (PACKAGES / "seg-synth-fp32" / MODEL_FILE).read_bytes()
    check_model_graph(write_package(tmp_path / "good", seg_manifest(
        inputs=[TensorSpec(name="image", shape=["batch", 1, 128, 128])],
        outputs=[TensorSpec(name="prob", shape=["batch", 1, 128, 128])]), real))
    with pytest.raises(PackageError, match=r"seg-test:0\.0\.1: model\.onnx does not load in ONNX Runtime: .*"
                       "INVALID_PROTOBUF"):
        check_model_graph(write_package(tmp_path / "random", seg_manifest(), bytes(range(256)) * 64))
    mismatched = write_package(tmp_path / "mismatched", seg_manifest(
        inputs=[TensorSpec(name="image", shape=["batch", 3, 128, 128], dtype="float16")],
        outputs=[TensorSpec(name="mask", shape=["batch", 1, 128, 128])]), real)
    with pytest.raises(PackageError) as refused:
        check_model_graph(mismatched)
    assert str(refused.value) == (
        "seg-test:0.0.1: model.onnx does not match the manifest: input 'image' is tensor(float) in the graph, "
        "float16 in the manifest; input 'image' has shape ['batch', 1, 128, 128] in the graph, "
        "['batch', 3, 128, 128] in the manifest; outputs are ['prob'] in the graph, ['mask'] in the manifest")
