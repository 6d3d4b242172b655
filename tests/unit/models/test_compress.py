"""Compression of seg-tiles: pruning keeps the function (exactly at keep=1, exactly away from the
borders for channels whose gamma is 0), halves widths and quarters GFLOP at keep=0.5 and still
exports; the fold runs (prune + fine-tune, teacher + distilled student, per-fold int8) write
fold results that models.seg_cv reads, on a handful of real tiles with tiny nets and 3 steps;
int8 of a native graph calibrated on frames of different sizes agrees with its fp32 graph through
the edge runtime; quantize_packages takes a native package."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from models.package.preprocess import reference_input  # noqa: E402
from models.package.session import SegmentationModel  # noqa: E402
from models import compress, quantize, seg_cv, tiles  # noqa: E402
from models import segmentation as seg  # noqa: E402
from models.package import load_package, write_package  # noqa: E402
from tests.tiny_tiles import tiny_tiles_root  # noqa: E402

pytestmark = pytest.mark.models
needs_data = pytest.mark.skipif(
    not tiles.tiles_available(), reason=f"magnetic-tile data not under {tiles.tiles_dir()} (set EDGELINE_DATA)"
)

TINY = {"batch": 4, "crop": 32}
"""Training-config updates that make a step take milliseconds."""


def scrambled(widths: tuple[int, int, int, int], seed: int = 0) -> seg.TileUNet:
    """A TileUNet whose BatchNorms have non-trivial gammas, betas and running statistics (a fresh
    one has gamma 1 everywhere: pruning by |gamma| would have no order to follow)."""
    torch.manual_seed(seed)
    model = seg.TileUNet(widths)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(-1.5, 1.5)
            module.bias.data.uniform_(-0.3, 0.6)
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_keep_one_is_the_same_function():
    model = scrambled((16, 32, 64, 96))
    pruned = compress.prune_unet(model, 1.0).eval()
    assert compress.unet_widths(pruned) == (16, 32, 64, 96)
    x = torch.randn(2, 1, 64, 80)
    with torch.no_grad():
        assert (pruned.logits(x) - model.logits(x)).abs().max() < 1e-5


def test_channels_of_zero_gamma_are_dropped_without_changing_the_interior():
    """Half the channels of every conv get gamma 0: each puts out the constant relu(beta), which the
    pruning folds into the next BN's mean. Away from the zero-padded borders the pruned net then
    computes what the big one did (without that fold: 0.08 off on this net)."""
    model = scrambled((16, 32, 64, 96), seed=1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.abs_().add_(0.5)
            module.bias.data.abs_()
            module.weight.data[module.weight.numel() // 2 :] = 0.0
    pruned = compress.prune_unet(model, 0.5).eval()
    x = torch.randn(1, 1, 256, 256)
    with torch.no_grad():
        diff = (pruned.logits(x) - model.logits(x))[..., 96:160, 96:160].abs().max()
    assert diff < 1e-4


def test_half_the_channels_halves_widths_quarters_gflop_and_exports():
    model = scrambled((16, 32, 64, 96))
    pruned = compress.prune_unet(model, 0.5).eval()
    assert compress.unet_widths(pruned) == (8, 16, 32, 48)
    assert pruned.dec1[3].out_channels == 8 and pruned.dec3[0].in_channels == 48 + 32 and pruned.head.in_channels == 8
    shape = (1, 1, 336, 272)
    ratio = seg.conv_flops(pruned, shape) / seg.conv_flops(model, shape)
    assert 0.22 < ratio < 0.28
    config = seg.SegTrainConfig(resize="native", widths=(8, 16, 32, 48))
    parity = seg.onnx_parity(pruned, seg.export_for(pruned, config), [np.random.default_rng(0).normal(
        size=(70, 90)).astype(np.float32)], 0.5)
    assert parity["parity_max_abs_diff"] < 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A few real tiles per class (symlinks, 5 = one per fold), a results and a work folder, and
    fold 0 weights of ``baseline`` (a (4,8,8,8) net trained 3 steps) where the CV harness keeps them."""
    base = tmp_path_factory.mktemp("compress")
    root = tiny_tiles_root(base, per_class=5, free=25)
    _, calib, test = seg_cv.fold_split(tiles.list_items(root), 0)
    assert calib and test
    work = base / "work"
    config = seg_cv.recipe_config("baseline", 1, widths=(4, 8, 8, 8), epochs=1, steps_per_epoch=3, **TINY)
    result = seg.train(config, compress._train_set(config, 0, root), seg.FrameSet([], [], []))
    seg.save_checkpoint(seg_cv.fold_weights("baseline", 0, work), config, result)
    return {"root": root, "work": work, "results": base / "results"}


def read_fold(results: Path, variant: str) -> dict:
    report = json.loads((results / variant / "fold0.json").read_text())
    metrics = seg_cv.fold_metrics(report)  # what the CV table reads
    assert 0.0 <= metrics["iou"] <= 1.0 and set(metrics) >= {"iou_defect_images", "recall[top10]"}
    return report


@needs_data
def test_pruned_fold_is_fine_tuned_scored_and_written(tiny):
    """Defaults: a quarter of the source's 3 steps (1) at a fifth of its learning rate."""
    report = compress.run_pruned_fold("baseline", 0, keep=0.5, work=tiny["work"], results=tiny["results"],
                                      root=tiny["root"])
    written = read_fold(tiny["results"], "baseline+prune50")
    assert written["config"]["widths"] == [2, 4, 4, 4] == report["config"]["widths"]
    assert written["finetune_steps"] == 1 and written["steps"] == 4
    assert written["config"]["lr"] == pytest.approx(0.2 * seg_cv.recipe_config("baseline").lr)
    assert seg_cv.fold_weights("baseline+prune50", 0, tiny["work"]).exists()
    assert len(written["test"]) == len(seg_cv.fold_split(tiles.list_items(tiny["root"]), 0)[2])


@needs_data
def test_teacher_and_distilled_student_are_trained_and_scored(tiny):
    report = compress.run_distilled_fold("baseline", 0, teacher_widths=(4, 8, 8, 8), teacher_steps=3,
                                         student_widths=(2, 4, 4, 4), steps=3, work=tiny["work"],
                                         results=tiny["results"], root=tiny["root"], **TINY)
    teacher = read_fold(tiny["results"], "baseline+teacher")
    assert teacher["config"]["widths"] == [4, 8, 8, 8] and teacher["steps"] == 3
    student = read_fold(tiny["results"], "baseline+distill")
    assert student["config"]["widths"] == [2, 4, 4, 4] == report["config"]["widths"]
    assert student["config"]["distill_weight"] == compress.STUDENT["distill_weight"] and student["steps"] == 3
    assert student["teacher_widths"] == [4, 8, 8, 8]
    assert seg_cv.fold_weights("baseline+teacher", 0, tiny["work"]).exists()


@needs_data
def test_int8_fold_through_the_cli_is_written_once(tiny, monkeypatch):
    monkeypatch.setenv("EDGELINE_DATA", str(tiny["root"]))
    args = ["int8", "--recipe", "baseline", "--folds", "0", "--work", str(tiny["work"]), "--results",
            str(tiny["results"])]
    compress.main(args)
    out = tiny["results"] / "baseline+int8" / "fold0.json"
    written = read_fold(tiny["results"], "baseline+int8")
    assert written["precision"] == "int8" and written["calib_method"] == "minmax" and written["calib_frames"] > 0
    stamp = out.stat().st_mtime_ns
    compress.main(args)  # a finished fold is kept, not redone
    assert out.stat().st_mtime_ns == stamp


def native_pair(tmp_path: Path, frames: list[np.ndarray]) -> tuple[SegmentationModel, SegmentationModel]:
    """fp32 and int8 packages of a small scrambled native net, int8 calibrated on ``frames``."""
    model = scrambled((8, 16, 16, 16), seed=2)
    config = seg.SegTrainConfig(resize="native", widths=(8, 16, 16, 16))
    manifest = seg.make_manifest(config)
    fp32 = write_package(tmp_path / "fp32", manifest, seg.export_for(model, config))
    calib = quantize.model_inputs(manifest, frames)
    assert isinstance(calib, list) and len({x.shape for x in calib}) > 1
    assert all(x.shape[1] % 16 == 0 and x.shape[2] % 16 == 0 for x in calib)
    int8_bytes = quantize.quantize_int8(fp32.model_path, calib, "minmax", "u8s8", tmp_path)
    assert any(node.op_type == "QuantizeLinear" for node in onnx.load_from_string(int8_bytes).graph.node)
    int8 = write_package(tmp_path / "int8", manifest.model_copy(update={"precision": "int8"}), int8_bytes)
    return SegmentationModel(fp32), SegmentationModel(int8)


def test_int8_of_a_native_graph_calibrated_on_frames_of_many_sizes(tmp_path):
    rng = np.random.default_rng(0)
    frames = [rng.integers(40, 200, (h, w), dtype=np.uint8) for h, w in ((37, 53), (64, 48), (90, 70), (33, 33))]
    fp32, int8 = native_pair(tmp_path, frames)
    for frame in (rng.integers(40, 200, (45, 61), dtype=np.uint8), rng.integers(40, 200, (80, 50), dtype=np.uint8)):
        ref, got = fp32.infer([frame])[0], int8.infer([frame])[0]
        assert got.shape == ref.shape == frame.shape
        assert np.abs(got - ref).mean() < 0.02 and np.abs(got - ref).max() < 0.2


@needs_data
def test_quantize_packages_takes_a_native_package(tiny, tmp_path):
    config, result = seg.load_checkpoint(seg_cv.fold_weights("baseline", 0, tiny["work"]))
    fp32 = write_package(tmp_path / "seg-tiles-fp32", seg.make_manifest(config), seg.export_for(result.model, config))
    packages = quantize.quantize_packages(load_package(fp32.folder), tmp_path / "out", max_iou_drop=1.0,
                                          calib_frames=6, threads=1, root=tiny["root"],
                                          methods=("minmax", "entropy"), activations=("u8s8",))
    int8 = packages["int8"].manifest
    assert int8.preprocess.resize == "native" and int8.precision == "int8"
    assert int8.bench["ms_per_frame_batch1"] > 0 and int8.bench["fp32_ms_per_frame_batch1"] > 0
    assert packages["fp16"].manifest.preprocess.resize == "native"
    assert reference_input(int8.preprocess) == (336, 272)
    assert {"calib_minmax_quick_iou", "calib_entropy_quick_iou"} <= set(int8.metrics)  # histograms: one shape


def test_pruning_to_given_widths_per_level():
    model = scrambled((16, 32, 64, 96))
    pruned = compress.prune_unet(model, (16, 16, 32, 64))
    assert compress.unet_widths(pruned) == (16, 16, 32, 64) and pruned.dec2[0].in_channels == 32 + 16
    assert compress.prune_name("baseline", (16, 16, 32, 64)) == "baseline+prune16-16-32-64"
    assert compress.prune_name("baseline", 0.5) == "baseline+prune50"
    with pytest.raises(ValueError, match="must be 1.."):
        compress.prune_unet(model, (32, 16, 32, 64))  # wider than the source: nothing to keep
