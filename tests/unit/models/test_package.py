import hashlib
import json

import pytest

from models.package import (
    MANIFEST_FILE,
    MODEL_FILE,
    AnomalyPostprocess,
    AnomalyPreprocess,
    Manifest,
    PackageError,
    SegmentationPostprocess,
    SegmentationPreprocess,
    TensorSpec,
    load_package,
    write_package,
)


def seg_manifest(**overrides):
    fields = dict(
        name="seg-test",
        version="0.0.1",
        task="segmentation",
        inputs=[TensorSpec(name="image", shape=["batch", 1, 120, 160])],
        outputs=[TensorSpec(name="prob", shape=["batch", 1, 120, 160])],
        preprocess=SegmentationPreprocess(height=120, width=160),
        postprocess=SegmentationPostprocess(threshold=0.5, min_area=10),
        metrics={"iou": 0.8},
    )
    fields.update(overrides)
    return Manifest(**fields)


def test_round_trip(tmp_path):
    written = write_package(tmp_path / "pkg", seg_manifest(), b"fake onnx bytes")
    loaded = load_package(tmp_path / "pkg")
    assert loaded.manifest == written.manifest
    assert loaded.manifest.files[MODEL_FILE] == hashlib.sha256(b"fake onnx bytes").hexdigest()
    assert loaded.model_path.read_bytes() == b"fake onnx bytes"
    assert loaded.manifest.metrics == {"iou": 0.8}
    assert loaded.manifest.signature is None
    assert loaded.ref == "seg-test:0.0.1"


def test_tampered_model_is_refused(tmp_path):
    write_package(tmp_path, seg_manifest(), b"fake onnx bytes")
    (tmp_path / MODEL_FILE).write_bytes(b"fake onnx bytez")
    with pytest.raises(PackageError, match="checksum mismatch for model.onnx"):
        load_package(tmp_path)


def test_missing_model_is_refused(tmp_path):
    write_package(tmp_path, seg_manifest(), b"x")
    (tmp_path / MODEL_FILE).unlink()
    with pytest.raises(PackageError, match="missing file model.onnx"):
        load_package(tmp_path)


def test_missing_manifest_is_refused(tmp_path):
    with pytest.raises(PackageError, match="missing file manifest.json"):
        load_package(tmp_path)


def test_bad_manifest_json_is_refused(tmp_path):
    write_package(tmp_path, seg_manifest(), b"x")
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(PackageError, match="bad manifest"):
        load_package(tmp_path)


def test_manifest_with_unknown_field_is_refused(tmp_path):
    write_package(tmp_path, seg_manifest(), b"x")
    data = json.loads((tmp_path / MANIFEST_FILE).read_text())
    data["surprise"] = 1
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(PackageError, match="surprise"):
        load_package(tmp_path)


def test_manifest_checksum_edit_is_refused(tmp_path):
    write_package(tmp_path, seg_manifest(), b"x")
    data = json.loads((tmp_path / MANIFEST_FILE).read_text())
    data["files"][MODEL_FILE] = "0" * 64
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(PackageError, match="checksum mismatch"):
        load_package(tmp_path)


def test_file_outside_package_is_refused(tmp_path):
    write_package(tmp_path / "pkg", seg_manifest(), b"x")
    data = json.loads((tmp_path / "pkg" / MANIFEST_FILE).read_text())
    data["files"]["../secret"] = "0" * 64
    (tmp_path / "pkg" / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(PackageError, match="outside the package"):
        load_package(tmp_path / "pkg")


def test_task_and_processing_must_agree():
    with pytest.raises(ValueError, match="must match task"):
        seg_manifest(task="anomaly")


def test_anomaly_manifest_checks_channel_counts():
    channels = ["a", "b"]
    pre = AnomalyPreprocess(channels=channels, mean=[0, 0], std=[1, 1], hidden_size=4)
    post = AnomalyPostprocess(residual_scale=[1.0], threshold=2.0)
    with pytest.raises(ValueError, match="one value per channel"):
        Manifest(
            name="a",
            version="1",
            task="anomaly",
            inputs=[TensorSpec(name="x", shape=["batch", 2])],
            outputs=[TensorSpec(name="y", shape=["batch", 2])],
            preprocess=pre,
            postprocess=post,
        )


def test_edge_and_package_never_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, edge.synthetic, edge.inference, edge.postprocess, edge.anomaly, models.package; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
