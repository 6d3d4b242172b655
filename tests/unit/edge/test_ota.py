"""Model swaps without an agent: agreement arithmetic, and the swapper on real packages."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np

from edge.inference import SegmentationModel
from edge.ota import ModelSwapper, mask_agreement
from edge.synthetic import SyntheticCamera
from edgeline.config import BUILTIN_PACKAGES
from models.package import load_package
from models.signing import builtin_trusted_keys


def test_mask_agreement_is_pooled_iou():
    a = [np.array([[0.9, 0.9], [0.1, 0.1]]), np.zeros((2, 2))]
    b = [np.array([[0.9, 0.1], [0.1, 0.1]]), np.zeros((2, 2))]
    assert mask_agreement(a, b, 0.5) == 0.5
    assert mask_agreement([np.zeros((2, 2))], [np.zeros((2, 2))], 0.5) == 1.0


def swapper() -> ModelSwapper:
    current = SegmentationModel(load_package(BUILTIN_PACKAGES / "seg-synth-int8"))
    return ModelSwapper({"seg": current}, builtin_trusted_keys(), providers={}, threads={})


def test_swap_measures_agreement_and_rolls_back():
    frames = [SyntheticCamera(seed=3, width=160, height=120).frame(i).image for i in range(0, 40, 10)]
    models = swapper()
    outcome = models.load("seg", BUILTIN_PACKAGES / "seg-synth-fp32", frames)
    assert outcome.ok and outcome.details["precision"] == "fp32" and 0.8 < outcome.details["agreement"] <= 1.0
    assert models.models["seg"].package.manifest.precision == "fp32"
    assert models.rollback("seg").ok and models.models["seg"].package.manifest.precision == "int8"
    assert not models.rollback("seg").ok  # nothing left to roll back to


def test_a_swap_names_both_packages_in_full(caplog):
    """Same name and version, two precisions: the log and the outcome must still tell them apart."""
    models = swapper()
    with caplog.at_level(logging.INFO, logger="edge.ota"):
        outcome = models.load("seg", BUILTIN_PACKAGES / "seg-synth-fp32", [])
    assert "seg-synth-1.0.0-fp32 in place of seg-synth-1.0.0-int8" in caplog.text
    assert "seg-synth-1.0.0-fp32 in place of seg-synth-1.0.0-int8" in outcome.text
    assert models.rollback("seg").text == "seg: back on seg-synth-1.0.0-int8"


def test_unknown_model_and_forged_signature_are_refused(tmp_path):
    models = swapper()
    assert "no model 'other'" in models.load("other", BUILTIN_PACKAGES / "seg-synth-fp32", []).text
    forged = tmp_path / "forged"
    shutil.copytree(BUILTIN_PACKAGES / "seg-synth-fp32", forged)
    manifest = json.loads((forged / "manifest.json").read_text())
    manifest["version"] = "9.9.9"  # a changed manifest no longer matches its signature
    (forged / "manifest.json").write_text(json.dumps(manifest))
    outcome = models.load("seg", forged, [])
    assert not outcome.ok and "signature" in outcome.text
    assert models.models["seg"].package.manifest.precision == "int8"
