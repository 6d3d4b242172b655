"""seg-tiles: size budget, ONNX parity, and a tiny end-to-end training run into tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from models.package.session import SegmentationModel  # noqa: E402
from models.package.synthetic import SyntheticCamera  # noqa: E402
from models import segmentation as seg  # noqa: E402
from models import tiles  # noqa: E402
from models.package import load_package  # noqa: E402
from tests.tiny_tiles import tiny_tiles_root  # noqa: E402

pytestmark = pytest.mark.models
needs_data = pytest.mark.skipif(
    not tiles.tiles_available(), reason=f"magnetic-tile data not under {tiles.tiles_dir()} (set EDGELINE_DATA)"
)


def tiny_root(tmp_path: Path, per_class: int = 3, free: int = 6) -> Path:
    return tiny_tiles_root(tmp_path, per_class, free)


def test_default_model_fits_the_jetson_budget():
    config = seg.SegTrainConfig()
    model = seg.TileUNet(config.widths)
    gflop = seg.conv_flops(model, (1, 1, 256, 256)) / 1e9
    assert 0.3 < gflop <= 2.0
    assert seg.count_params(model) < 2_000_000
    assert not any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in model.modules())  # no depthwise


def test_onnx_export_matches_torch_on_frames():
    torch.manual_seed(0)
    model = seg.TileUNet((8, 16, 16, 24))
    model.train()
    with torch.no_grad():  # give BatchNorm non-trivial running statistics
        for _ in range(3):
            model(torch.randn(4, 1, 64, 64) * 2 + 0.5)
    model.eval()
    config = seg.SegTrainConfig()
    spec = seg.preprocess_spec(config)
    camera = SyntheticCamera(5, defect_rate=1.0)
    from models.package.preprocess import preprocess_frame

    x = np.stack([preprocess_frame(camera.frame(i).image, spec)[0] for i in (3, 17, 40)]).astype(np.float16)
    parity = seg.onnx_parity(model, seg.export_onnx(model, config.size), x, 0.5)
    assert parity["parity_max_abs_diff"] < 1e-4
    assert parity["parity_pixel_agreement"] >= 0.999


def test_lr_schedule_warms_up_and_anneals():
    assert seg.lr_at(0.0, 1.0) < seg.lr_at(0.05, 1.0) == pytest.approx(1.0)
    assert seg.lr_at(1.0, 1.0) == pytest.approx(0.01)


def test_sampler_is_deterministic_and_mixes_sources():
    config = seg.SegTrainConfig(batch=8, crop=32)
    x = np.random.default_rng(0).normal(size=(6, 64, 64)).astype(np.float16)
    y = np.zeros_like(x)
    y[:3, 20:30, 20:30] = 1
    tiles_set = seg.FrameSet(x, y, ["Crack"] * 3 + ["Free"] * 3)
    synth = seg.FrameSet(x[:2], y[:2], ["synthetic"] * 2)
    a = seg.Sampler(tiles_set, synth, config, np.random.default_rng(1)).batch()
    b = seg.Sampler(tiles_set, synth, config, np.random.default_rng(1)).batch()
    assert a[0].shape == (8, 1, 32, 32) and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@needs_data
def test_tiny_training_run_writes_a_working_fp32_package(tmp_path):
    root = tiny_root(tmp_path)
    package, model, _ = seg.train_fp32_package(tmp_path / "out", seg.SMOKE_CONFIG, progress=False, root=root)
    loaded = load_package(tmp_path / "out" / "seg-tiles-fp32")
    assert loaded.manifest.name == "seg-tiles" and loaded.manifest.precision == "fp32"
    metrics = loaded.manifest.metrics
    for key in ("iou", "dice", "image_recall", "false_alarm_rate", "synthetic_iou", "params", "gflops",
                "parity_max_abs_diff", "iou_crack"):
        assert key in metrics, key
    assert metrics["parity_pixel_agreement"] >= 0.999
    post = loaded.manifest.postprocess
    assert post.alarm_threshold == metrics["alarm_pixel_threshold"] and post.alarm_area_ratio == metrics["area_threshold"]
    assert loaded.model_path.stat().st_size < 4_000_000
    edge_model = SegmentationModel(loaded)
    frame = SyntheticCamera(1).frame(0).image
    (prob,) = edge_model.infer([frame])
    assert prob.shape == frame.shape[:2] and 0.0 <= prob.min() and prob.max() <= 1.0


def test_presets_and_unknown_preset():
    from models import seg_cv

    shipped = seg.preset("default")
    assert shipped.epochs * shipped.steps_per_epoch == 12_000 and shipped.cv_recipe == seg.SHIPPED_RECIPE
    assert shipped.resize == seg.preset("default", **seg_cv.RECIPES[seg.SHIPPED_RECIPE]).resize
    assert seg.preset("fixed256").resize == "fixed"
    assert seg.preset("default", seed=3).seed == 3
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        seg.preset("fast")


@needs_data
def test_checkpoint_packages_the_same_weights(tmp_path):
    root = tiny_root(tmp_path)
    config = seg.SMOKE_CONFIG
    _, model, _ = seg.train_fp32_package(tmp_path / "a", config, progress=False, root=root,
                                      save_to=tmp_path / "w.pt")
    other = config.model_copy(update={"threads": 1, "seed": 9})
    _, again, _ = seg.train_fp32_package(tmp_path / "b", other, progress=False, root=root, checkpoint=tmp_path / "w.pt")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    manifest = load_package(tmp_path / "b" / "seg-tiles-fp32").manifest
    assert manifest.metrics["train_seed"] == config.seed  # the checkpoint's own config, not the caller's
    assert (tmp_path / "a" / "seg-tiles-fp32" / "model.onnx").read_bytes() == \
        (tmp_path / "b" / "seg-tiles-fp32" / "model.onnx").read_bytes()


def test_synthetic_dataset_builds_seg_synth_without_tile_data(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELINE_DATA", str(tmp_path / "nowhere"))
    config = seg.preset("synthetic", epochs=1, steps_per_epoch=4, synthetic_cameras=1, synthetic_frames=8,
                        calib_frames=4)
    packages = seg.build_segmentation_packages(tmp_path / "out", config, progress=False)
    assert set(packages) == {"fp32", "int8", "fp16"}
    fp32 = load_package(tmp_path / "out" / "seg-synth-fp32")
    assert fp32.manifest.preprocess.height == 128 and fp32.manifest.metrics["gflops"] < 0.2
    assert "iou_crack" not in fp32.manifest.metrics and "synthetic_iou" not in fp32.manifest.metrics
    assert fp32.manifest.metrics["val_images"] == tiles.SYNTH_EVAL_CAMERAS * tiles.SYNTH_EVAL_FRAMES


def _frames(sizes: list[tuple[int, int]], classes: list[str]) -> seg.FrameSet:
    """Noise frames of ``sizes``; a 6x6 defect in the middle of every non-Free one."""
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for (h, w), cls in zip(sizes, classes):
        xs.append(rng.normal(size=(h, w)).astype(np.float16))
        y = np.zeros((h, w), np.float16)
        if cls != tiles.FREE:
            y[h // 2 - 3 : h // 2 + 3, w // 2 - 3 : w // 2 + 3] = 1
        ys.append(y)
    return seg.FrameSet(xs, ys, classes)


def test_class_balanced_sampling_draws_every_defect_class_alike():
    classes = ["Blowhole"] * 12 + ["Fray"] * 2 + ["Free"] * 4
    frames = _frames([(40, 50)] * len(classes), classes)
    config = seg.SegTrainConfig(batch=4, crop=32, sampling="class_balanced", defect_fraction=1.0)
    sampler = seg.Sampler(frames, seg.FrameSet([], [], []), config, np.random.default_rng(0))
    drawn = [classes[sampler._defect_frame()] for _ in range(2000)]
    assert 0.45 < drawn.count("Fray") / len(drawn) < 0.55  # 2 of 14 images, half of the draws
    mixed = seg.Sampler(frames, seg.FrameSet([], [], []), config.model_copy(update={"sampling": "mixed"}),
                        np.random.default_rng(0))
    assert [classes[mixed._defect_frame()] for _ in range(2000)].count("Fray") < 400


def test_crops_of_frames_smaller_than_the_crop_and_of_any_size():
    frames = _frames([(20, 90), (70, 33), (128, 128)], ["Crack", "Free", "Crack"])
    config = seg.SegTrainConfig(batch=6, crop=48, blur=1.0, noise=0.1, gamma=0.3)
    x, y = seg.Sampler(frames, seg.FrameSet([], [], []), config, np.random.default_rng(2)).batch()
    assert x.shape == y.shape == (6, 1, 48, 48) and torch.isfinite(x).all()
    assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0


def test_hard_negatives_are_the_most_defect_like_spots_of_free_frames():
    frames = _frames([(32, 48)] * 6, ["Free"] * 6)
    frames.x[4][10, 20] = 60.0  # one bright speck: a thresholding "model" finds it
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.Sigmoid())
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.fill_(-10.0)
    spots = seg.mine_hard_negatives(model, frames, 6, np.random.default_rng(0))
    assert spots[0] == (4, 10, 20) and len(spots) == 3


def test_focal_tversky_weighs_a_missed_pixel_more_than_a_false_one():
    config = seg.SegTrainConfig(loss="focal_tversky", tversky_alpha=0.3)
    target = torch.zeros(1, 1, 8, 8)
    target[0, 0, :2, :2] = 1
    missed = torch.full((1, 1, 8, 8), -6.0)  # nothing predicted: 4 missed pixels
    false = torch.full((1, 1, 8, 8), -6.0)
    false[0, 0, :2, :2] = 6.0
    false[0, 0, 4:6, 4:6] = 6.0  # the defect plus 4 false pixels
    assert seg.seg_loss(missed, target, config) > seg.seg_loss(false, target, config)
    plain = config.model_copy(update={"loss": "bce_dice"})
    assert seg.seg_loss(missed, target, plain) > 0 and seg.seg_loss(false, target, plain) > 0


def test_native_export_and_predict_agree_on_frames_of_any_size():
    torch.manual_seed(0)
    model = seg.TileUNet((8, 8, 16, 16)).eval()
    config = seg.SegTrainConfig(resize="native", widths=(8, 8, 16, 16))
    xs = [np.random.default_rng(i).normal(size=size).astype(np.float16) for i, size in
          enumerate([(50, 70), (37, 61), (64, 64)])]
    probs = seg.predict(model, xs)
    assert [p.shape for p in probs] == [x.shape for x in xs]
    parity = seg.onnx_parity(model, seg.export_for(model, config), xs, 0.5)
    assert parity["parity_max_abs_diff"] < 1e-4
    manifest = seg.make_manifest(config)
    assert manifest.preprocess.resize == "native" and manifest.inputs[0].shape == ["batch", 1, "height", "width"]
    assert seg.model_input(config) == (336, 272)


def test_a_killed_run_resumes_where_it_was_and_ends_like_an_unbroken_one(tmp_path):
    frames = _frames([(48, 48)] * 6, ["Crack"] * 3 + ["Free"] * 3)
    empty = seg.FrameSet([], [], [])
    config = seg.SegTrainConfig(epochs=2, steps_per_epoch=3, batch=2, crop=32, widths=(4, 4, 8, 8), threads=1,
                                hard_negatives=0.5, mine_every=2, mine_images=3)
    unbroken = seg.train(config, frames, empty)
    path = tmp_path / "run.pt"
    with pytest.raises(_Killed):  # killed after its first epoch's checkpoint
        seg.train(config, frames, empty, on_epoch=lambda epoch, _: _stop_after(epoch, 1), resume_from=path)
    with pytest.raises(ValueError, match="unfinished run"):
        seg.load_checkpoint(path)
    resumed = seg.train(config, frames, empty, resume_from=path)
    assert resumed.steps == unbroken.steps == 6
    for (name, a), (_, b) in zip(unbroken.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    with pytest.raises(ValueError, match="another training config"):
        seg.train(config.model_copy(update={"lr": 1e-2}), frames, empty, resume_from=path)


class _Killed(Exception):
    pass


def _stop_after(epoch: int, last: int) -> None:
    if epoch >= last:
        raise _Killed


@needs_data
def test_the_shipped_build_records_cv_figures_recipe_data_hash_and_a_calibrated_alarm(tmp_path, monkeypatch):
    from models import seg_cv

    root = tiny_root(tmp_path, per_class=4, free=30)
    monkeypatch.setattr(seg_cv, "RESULTS", tmp_path / "cv")
    config = seg.SegTrainConfig(resize="native", cv_recipe="tiny", epochs=1, steps_per_epoch=3, batch=4, crop=64,
                                widths=(4, 8, 8, 8), calib_frames=4, threads=1, max_iou_drop=1.0)
    torch.manual_seed(0)
    net = seg.TileUNet(config.widths).eval()
    for fold in (0, 1):  # a real (if untrained) net scored on two real folds: what the CV harness writes
        report = seg_cv.score_fold(seg.export_for(net, config), config, fold, 1, root=root) | {"steps": 3}
        seg_cv.write_fold(report, "tiny", fold, tmp_path / "cv")
    packages = seg.build_segmentation_packages(tmp_path / "out", config, progress=False, root=root)
    fp32 = packages["fp32"].manifest
    assert fp32.training["data_sha256"] == seg_cv.dataset_sha256(tiles.list_items(root))
    assert fp32.training["cv"]["folds"] == [0, 1] and fp32.training["recipe"]["cv_recipe"] == "tiny"
    summary = seg_cv.recipe_summary("tiny")
    assert fp32.metrics["cv_iou_defect_images"] == pytest.approx(summary["mean"]["iou_defect_images"])
    assert "cv_iou_defect_images_std" in fp32.metrics and "iou" not in fp32.metrics
    assert fp32.preprocess.resize == "native" and fp32.postprocess.alarm_threshold is not None
    _, calib_items = seg_cv.split_calibration(tiles.list_items(root))
    for package in (packages["fp32"], packages["int8"]):
        model = SegmentationModel(package)
        from models.package.postprocess import image_alarm

        fired = [image_alarm(p, package.manifest.postprocess, []) for p in
                 model.infer([item.load()[0] for item in calib_items])]
        assert sum(fired) <= config.max_false_alarms * len(fired)  # the budget, on the tiles that set it
    int8 = packages["int8"].manifest
    assert int8.training == fp32.training and "gate_iou" in int8.metrics and "iou" not in int8.metrics
