"""int8 of the trained seg-tiles model stays within the gate; the gate refuses with its numbers
and writes nothing; the fp16 package loads. Runs on a few real tiles (no torch needed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from edge.inference import SegmentationModel
from edgeline.config import BUILTIN_PACKAGES
from models import quantize, tiles
from models.package import load_package

FP32 = BUILTIN_PACKAGES / "seg-tiles-fp32"
pytestmark = [
    pytest.mark.skipif(not tiles.tiles_available(), reason=f"magnetic-tile data not under {tiles.tiles_dir()}"),
    pytest.mark.skipif(not FP32.exists(), reason="no seg-tiles-fp32 package (run: edgeline models train-seg)"),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A data folder holding a few real tiles per class (symlinks); val gets ~1-2 per class."""
    root = tmp_path_factory.mktemp("data")
    for cls in tiles.CLASSES:
        src = tiles.tiles_dir() / f"MT_{cls}"
        dst = root / "magnetic-tile" / f"MT_{cls}"
        dst.mkdir(parents=True)
        for image in sorted(src.glob("*.jpg"))[: 16 if cls == tiles.FREE else 8]:
            for path in (image, image.with_suffix(".png")):
                os.symlink(path, dst / path.name)
    return root


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


def test_gate_refuses_a_really_damaged_int8_model(tmp_path):
    """Quantizing the input layer too wrecks this model (measured: IoU 0.62 -> 0.16); the
    default gate must catch it with the numbers and write nothing."""
    fp32 = load_package(FP32)
    with pytest.raises(quantize.QualityGateError, match="allowed 0.0100") as err:  # the whole val split
        quantize.quantize_packages(fp32, tmp_path, calib_frames=16, methods=("minmax",), activations=("u8s8",),
                                   fp16=False, fp32_input_layer=False, fp32_metrics=fp32.manifest.metrics)
    assert err.value.fp32_iou - err.value.quant_iou > 0.05
    assert not any(tmp_path.iterdir())


def test_impossible_gate_refuses_with_both_numbers_and_writes_nothing(root, tmp_path):
    with pytest.raises(quantize.QualityGateError, match="quality gate failed") as err:
        quantize.quantize_packages(load_package(FP32), tmp_path, max_iou_drop=-1.0, calib_frames=6, root=root,
                                   methods=("minmax",), activations=("u8s8",), fp16=False)
    assert f"{err.value.fp32_iou:.4f}" in str(err.value) and f"{err.value.quant_iou:.4f}" in str(err.value)
    assert not any(tmp_path.iterdir())
