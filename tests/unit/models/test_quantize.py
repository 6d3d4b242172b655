"""int8 of the trained seg-tiles model stays within the gate; the gate refuses with its numbers
and writes nothing; the fp16 package loads. Runs on a few real tiles (no torch needed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from edge.inference import SegmentationModel
from edge.synthetic import SyntheticCamera
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
    packages = quantize.quantize_packages(load_package(FP32), out, max_iou_drop=0.02, calib_frames=12, root=root,
                                          methods=("minmax", "percentile"))
    return out, packages


def test_int8_keeps_iou_within_the_gate(quantized):
    out, packages = quantized
    int8 = load_package(out / "seg-tiles-int8")
    metrics = int8.manifest.metrics
    assert int8.manifest.precision == "int8"
    assert metrics["iou_drop_vs_fp32"] <= 0.02
    assert metrics["fp32_iou"] - metrics["iou"] == pytest.approx(metrics["iou_drop_vs_fp32"])
    assert any(k.startswith("calib_") and k.endswith("_chosen") for k in metrics)
    assert {"u8s8_ms_per_frame_batch1", "s8s8_ms_per_frame_batch1"} <= set(int8.manifest.bench)
    assert int8.model_path.stat().st_size < load_package(FP32).model_path.stat().st_size


def test_fp16_package_loads_and_agrees_with_fp32(quantized):
    out, _ = quantized
    fp16 = load_package(out / "seg-tiles-fp16")
    assert fp16.manifest.precision == "fp16"
    model = SegmentationModel(fp16)  # loads and warms up in ORT
    if fp16.manifest.metrics["cpu_runs"]:
        frame = SyntheticCamera(2, defect_rate=1.0).frame(30).image
        ref = SegmentationModel(load_package(FP32)).infer([frame])[0]
        assert np.abs(model.infer([frame])[0] - ref).max() < 0.02
        assert fp16.manifest.metrics["parity_pixel_agreement_vs_fp32"] >= 0.999


def test_impossible_gate_refuses_with_both_numbers_and_writes_nothing(root, tmp_path):
    with pytest.raises(quantize.QualityGateError, match="quality gate failed") as err:
        quantize.quantize_packages(load_package(FP32), tmp_path, max_iou_drop=-1.0, calib_frames=6, root=root,
                                   methods=("minmax",), activations=("u8s8",), fp16=False)
    assert f"{err.value.fp32_iou:.4f}" in str(err.value) and f"{err.value.quant_iou:.4f}" in str(err.value)
    assert not any(tmp_path.iterdir())
