"""Model swaps without an agent: agreement arithmetic, and the swapper on real packages."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.package.session import ModelLoadError, SegmentationModel
from edge.ota import DownloadError, ModelSwapper, ShadowRun, check_download_url, fetch_package, mask_agreement
from models.package.synthetic import SyntheticCamera
from models.package import BUILTIN_PACKAGES, CACHE_ENV, PackageSettings, load_package, write_package_tar
from models.package.signing import builtin_trusted_keys
from tests.tiny_segmentation import surface, write_dark_block_package


def test_mask_agreement_is_pooled_iou():
    a = [np.array([[0.9, 0.9], [0.1, 0.1]]), np.zeros((2, 2))]
    b = [np.array([[0.9, 0.1], [0.1, 0.1]]), np.zeros((2, 2))]
    assert mask_agreement(a, b, 0.5) == 0.5
    assert mask_agreement([np.zeros((2, 2))], [np.zeros((2, 2))], 0.5) == 1.0


def swapper(downloads: Path = Path("downloads")) -> ModelSwapper:
    current = SegmentationModel(load_package(BUILTIN_PACKAGES / "seg-synth-int8"))
    return ModelSwapper({"seg": current}, builtin_trusted_keys(), providers={}, threads={}, downloads=downloads)


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


@pytest.mark.parametrize(("url", "reason"), [
    ("file:///etc/passwd", "only http:// and https:// URLs"),
    ("ftp://central/models/a/download", "only http:// and https:// URLs"),
    ("http:///models/a/download", "only http:// and https:// URLs"),
    ("https://central.plant:8443.evil.example/models/a/download", "Port could not be cast to integer"),
    ("https://central.plant.evil.example:8443/models/a/download", "not under packages.download_urls"),
    ("https://central.plant:9443/models/a/download", "not under packages.download_urls"),
    ("http://central.plant:8443/models/a/download", "not under packages.download_urls"),
    ("https://central.plant:8443/modelsx/a", "not under packages.download_urls"),
])
def test_download_urls_outside_the_allow_list_are_refused(url, reason):
    with pytest.raises(DownloadError, match=reason):
        check_download_url(url, ["https://central.plant:8443/models"])


def test_download_urls_under_the_allow_list_pass_with_their_query():
    check_download_url("https://central.plant:8443/models/a/download?token=x.y", ["https://central.plant:8443/models/"])
    check_download_url("https://CENTRAL.plant/models/a", ["https://central.plant:443/"])
    check_download_url("http://10.0.0.5:8080/models/a/download", [])  # no list: any http(s) URL


def test_a_refused_url_writes_nothing(tmp_path):
    with pytest.raises(DownloadError, match="only http:// and https://"):
        fetch_package("file:///etc/passwd", hashlib.sha256(b"").hexdigest(), tmp_path / "downloads", PackageSettings())
    with pytest.raises(DownloadError, match="is not 64 hex digits"):
        fetch_package("http://127.0.0.1:9/x.tar", "../../escape", tmp_path / "downloads", PackageSettings())
    assert not (tmp_path / "downloads").exists()


def test_refused_downloads_are_removed_and_local_packages_kept(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    models = swapper(downloads)
    unknown = write_package_tar(BUILTIN_PACKAGES / "seg-synth-fp32", downloads / "a.tar")
    assert "no model 'other' on this machine" in models.load("other", unknown, []).text
    assert not unknown.exists()
    random_onnx = tmp_path / "random"
    shutil.copytree(BUILTIN_PACKAGES / "seg-synth-fp32", random_onnx)
    manifest = json.loads((random_onnx / "manifest.json").read_text())
    (random_onnx / "model.onnx").write_bytes(b"not onnx")
    manifest["files"]["model.onnx"] = hashlib.sha256(b"not onnx").hexdigest()
    (random_onnx / "manifest.json").write_text(json.dumps(manifest))
    unsigned = ModelSwapper(models.models, None, providers={}, threads={}, downloads=downloads)
    assert "INVALID_PROTOBUF" in unsigned.load("seg", write_package_tar(random_onnx, downloads / "b.tar"), []).text
    local = write_package_tar(random_onnx, tmp_path / "c.tar")
    assert "INVALID_PROTOBUF" in unsigned.load("seg", local, []).text
    with pytest.raises(ModelLoadError, match="INVALID_PROTOBUF"):
        unsigned.candidate("seg", local)
    assert list(downloads.iterdir()) == [] and local.exists()  # a tar given on this box stays
    assert list((tmp_path / "cache" / "packages").iterdir()) == []


def camera_frames() -> list[np.ndarray]:
    """Recent frames of two cameras of different sizes, neither a multiple of the native stride."""
    return [surface(97, 130, (slice(16, 48), slice(32, 64))), surface(61, 91, (slice(30, 61), slice(0, 40))),
            surface(97, 130, (slice(60, 97), slice(90, 130)), color=True)]


def test_a_native_package_replaces_a_fixed_one_after_a_self_test_on_the_cameras_frames(tmp_path):
    """Old: every frame resized to 48x64. New: each frame at its own size (padded to the stride).
    Both answer at frame size, so the self-test passes on the real frames and their masks compare."""
    fixed = SegmentationModel(write_dark_block_package(tmp_path / "fixed", resize="fixed", dynamic=False))
    native = write_dark_block_package(tmp_path / "native", version="2.0.0")
    models = ModelSwapper({"seg": fixed}, None, providers={}, threads={}, downloads=tmp_path / "downloads")
    frames = camera_frames()
    outcome = models.load("seg", native.folder, frames)
    assert outcome.ok, outcome.text
    assert models.models["seg"].spec.resize == "native" and outcome.details["self_test_frames"] == 3
    maps = models.models["seg"].infer(frames)
    assert [m.shape for m in maps] == [f.shape[:2] for f in frames]
    assert outcome.details["agreement"] == round(mask_agreement(maps, fixed.infer(frames), 0.5), 4)
    assert 0.8 < outcome.details["agreement"] < 1.0  # the same dark blocks, found at two resolutions


def test_a_native_package_whose_graph_has_a_fixed_size_is_refused_by_the_swap(tmp_path):
    fixed = SegmentationModel(write_dark_block_package(tmp_path / "fixed", resize="fixed"))
    models = ModelSwapper({"seg": fixed}, None, providers={}, threads={}, downloads=tmp_path / "downloads")
    outcome = models.load("seg", write_dark_block_package(tmp_path / "bad", dynamic=False).folder, camera_frames())
    assert not outcome.ok and "dynamic height and width" in outcome.text
    assert models.models["seg"] is fixed


def test_shadow_agreement_of_a_native_candidate_beside_a_fixed_model(tmp_path):
    fixed = SegmentationModel(write_dark_block_package(tmp_path / "fixed", resize="fixed"))
    shadow = ShadowRun(SegmentationModel(write_dark_block_package(tmp_path / "native")), every=2)
    frames = camera_frames()
    for _ in range(4):
        shadow.maybe_compare(frames, fixed.infer(frames), current_s=0.01, threshold=0.5)
    status = shadow.status()
    assert status.frames == 2 * len(frames)  # batches 2 and 4 of 4
    assert status.agreement == pytest.approx(mask_agreement(shadow.model.infer(frames), fixed.infer(frames), 0.5))
    assert 0.8 < status.agreement < 1.0 and status.latency_ratio > 0
