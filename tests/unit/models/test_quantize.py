"""int8 of the trained seg-tiles model stays within the gate; the gate refuses an int8 damaged on
purpose, with its numbers, and writes nothing; the fp16 package loads. Runs on a few real tiles (no torch needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from models.package.session import SegmentationModel
from models import quantize, tiles
from models.package import BUILTIN_PACKAGES, Package, load_package
from tests.tiny_tiles import tiny_tiles_root

FP32 = BUILTIN_PACKAGES / "seg-tiles-fp32"
pytestmark = [
    pytest.mark.skipif(not tiles.tiles_available(), reason=f"magnetic-tile data not under {tiles.tiles_dir()}"),
    pytest.mark.skipif(not FP32.exists(), reason="no seg-tiles-fp32 package (run: edgeline models train-seg)"),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A data folder holding a few real tiles per class (symlinks); val gets ~1-2 per class."""
    return tiny_tiles_root(tmp_path_factory.mktemp("tiles"), per_class=8, free=16)


@pytest.fixture(scope="module")
def quantized(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("packages")
    packages = quantize.quantize_packages(load_package(FP32), out, calib_frames=12, root=root,
                                          methods=("minmax", "percentile"))
    return out, packages


def test_int8_keeps_iou_within_the_gate(quantized):
    out, packages = quantized
    int8 = load_package(out / "seg-tiles-int8")
    metrics = int8.manifest.metrics
    assert int8.manifest.precision == "int8"
    assert metrics["iou_drop_vs_fp32"] <= 0.01 == metrics["max_iou_drop"]
    assert metrics["fp32_input_layer"] == 1.0
    post = int8.manifest.postprocess
    assert post.alarm_threshold == metrics["alarm_pixel_threshold"] and post.alarm_area_ratio == metrics["area_threshold"]
    assert metrics["fp32_iou"] - metrics["iou"] == pytest.approx(metrics["iou_drop_vs_fp32"])
    assert any(k.startswith("calib_") and k.endswith("_chosen") for k in metrics)
    assert {"u8s8_ms_per_frame_batch1", "s8s8_ms_per_frame_batch1"} <= set(int8.manifest.bench)
    assert int8.model_path.stat().st_size < load_package(FP32).model_path.stat().st_size


def test_fp16_package_loads_and_agrees_with_fp32(quantized, root):
    out, _ = quantized
    fp16 = load_package(out / "seg-tiles-fp16")
    assert fp16.manifest.precision == "fp16"
    model = SegmentationModel(fp16)  # loads and warms up in ORT
    if fp16.manifest.metrics["cpu_runs"]:
        frame = next(it for it in tiles.list_items(root) if it.cls == "Blowhole").load()[0]
        ref = SegmentationModel(load_package(FP32)).infer([frame])[0]
        got = model.infer([frame])[0]
        assert np.abs(got - ref).max() < 0.05  # fp16 logits: a few hundredths of probability near 0.5
        assert ((got > 0.5) == (ref > 0.5)).mean() >= 0.999
        assert fp16.manifest.metrics["parity_pixel_agreement_vs_fp32"] >= 0.999


def negate_weight_scales(onnx_bytes: bytes, conv: str = "/enc1/enc1.3/Conv") -> bytes:
    """``onnx_bytes`` with the int8 weight scales of one conv negated: that conv's output flips
    sign, so the ReLU after it blocks what it should pass (a corrupted layer, whatever the quantizer)."""
    model = onnx.load_from_string(onnx_bytes)
    weight = next(node for node in model.graph.node if node.name == conv).input[1]
    scale_name = next(node for node in model.graph.node if node.output[0] == weight).input[1]
    scale = next(t for t in model.graph.initializer if t.name == scale_name)
    scale.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(scale), scale_name))
    return model.SerializeToString()


DAMAGES = ("calibrated-on-frames-at-1/100", "one-conv-weight-scales-negated")
"""Damage that must hurt whatever the quantizer: activation ranges 100x too narrow (real
activations clip), or one conv's output flipped in sign."""


def damage(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every int8 candidate that :func:`quantize.quantize_packages` builds damaged in ``kind``'s way."""
    if kind == "calibrated-on-frames-at-1/100":
        frames = quantize.calibration_frames
        monkeypatch.setattr(quantize, "calibration_frames", lambda *args, **kw: frames(*args, **kw) / 100)
    else:
        quantize_int8 = quantize.quantize_int8
        monkeypatch.setattr(quantize, "quantize_int8",
                            lambda *args, **kw: negate_weight_scales(quantize_int8(*args, **kw)))


def quantize_with_default_gate(root: Path, out: Path) -> dict[str, Package]:
    return quantize.quantize_packages(load_package(FP32), out, calib_frames=12, root=root, methods=("minmax",),
                                      activations=("u8s8",), fp16=False)


def test_default_gate_passes_the_int8_model(root, tmp_path):
    """The companion of the next test: the same quantization, undamaged, is written (on these tiles
    with onnxruntime 1.32: val IoU 0.781 vs fp32 0.771)."""
    metrics = quantize_with_default_gate(root, tmp_path)["int8"].manifest.metrics
    assert metrics["iou_drop_vs_fp32"] <= metrics["max_iou_drop"] == 0.01


@pytest.mark.parametrize("kind", DAMAGES)
def test_default_gate_refuses_a_damaged_int8_model(kind, root, tmp_path, monkeypatch):
    """Either damage scores val IoU 0.000 (onnxruntime 1.32; fp32 0.771 on these tiles, 0.561 on the
    whole val split), far past the 1-point gate: refused with both numbers, nothing written."""
    damage(kind, monkeypatch)
    with pytest.raises(quantize.QualityGateError, match="allowed 0.0100") as err:
        quantize_with_default_gate(root, tmp_path)
    assert err.value.fp32_iou - err.value.quant_iou > 0.2  # 20x the gate: no quirk of a quantizer decides it
    assert not any(tmp_path.iterdir())


def test_impossible_gate_refuses_with_both_numbers_and_writes_nothing(root, tmp_path):
    with pytest.raises(quantize.QualityGateError, match="quality gate failed") as err:
        quantize.quantize_packages(load_package(FP32), tmp_path, max_iou_drop=-1.0, calib_frames=6, root=root,
                                   methods=("minmax",), activations=("u8s8",), fp16=False)
    assert f"{err.value.fp32_iou:.4f}" in str(err.value) and f"{err.value.quant_iou:.4f}" in str(err.value)
    assert not any(tmp_path.iterdir())
