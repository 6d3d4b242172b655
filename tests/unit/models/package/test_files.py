import hashlib
import io
import json
import tarfile

import pytest

from models.package.files import load_package, write_package, write_package_tar
from models.package.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    AnomalyPostprocess,
    AnomalyPreprocess,
    Manifest,
    PackageError,
    PackageSettings,
    SegmentationPostprocess,
    SegmentationPreprocess,
    TensorSpec,
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


# ---------------------------------------------------------------- files the manifest does not list


def test_unlisted_onnx_file_is_refused(tmp_path):
    write_package(tmp_path, seg_manifest(), b"x")
    (tmp_path / "other.onnx").write_bytes(b"unverified weights")
    with pytest.raises(PackageError, match="unlisted file other.onnx"):
        load_package(tmp_path)


def test_unlisted_file_in_a_subfolder_is_refused(tmp_path):
    write_package(tmp_path, seg_manifest(), b"x")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "weights.bin").write_bytes(b"external data")
    with pytest.raises(PackageError, match="unlisted file data/weights.bin"):
        load_package(tmp_path)


def test_listed_file_in_a_subfolder_is_verified(tmp_path):
    write_package(tmp_path, seg_manifest(), b"x")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "weights.bin").write_bytes(b"external data")
    data = json.loads((tmp_path / MANIFEST_FILE).read_text())
    data["files"]["data/weights.bin"] = hashlib.sha256(b"external data").hexdigest()
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data))
    assert "data/weights.bin" in load_package(tmp_path).manifest.files


@pytest.mark.parametrize("name", ["/etc/passwd", "a/../../x", "..\\x"])
def test_absolute_or_parent_paths_are_refused(tmp_path, name):
    write_package(tmp_path / "pkg", seg_manifest(), b"x")
    data = json.loads((tmp_path / "pkg" / MANIFEST_FILE).read_text())
    data["files"][name] = "0" * 64
    (tmp_path / "pkg" / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(PackageError, match="outside the package"):
        load_package(tmp_path / "pkg")


def test_symlink_out_of_the_package_is_refused(tmp_path):
    (tmp_path / "secret").write_bytes(b"secret")
    write_package(tmp_path / "pkg", seg_manifest(), b"x")
    (tmp_path / "pkg" / "link").symlink_to(tmp_path / "secret")
    data = json.loads((tmp_path / "pkg" / MANIFEST_FILE).read_text())
    data["files"]["link"] = hashlib.sha256(b"secret").hexdigest()
    (tmp_path / "pkg" / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(PackageError, match="link points outside the package"):
        load_package(tmp_path / "pkg")


def test_missing_package_path_is_named(tmp_path):
    with pytest.raises(PackageError, match="no such package folder or file"):
        load_package(tmp_path / "nope")
    (tmp_path / "model.zip").write_bytes(b"x")
    with pytest.raises(PackageError, match="not a package"):
        load_package(tmp_path / "model.zip")


# ---------------------------------------------------------------- tar packages


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tgz"])
def test_tar_package_round_trip(tmp_path, suffix):
    write_package(tmp_path / "pkg", seg_manifest(), b"fake onnx bytes")
    tar_path = write_package_tar(tmp_path / "pkg", tmp_path / f"pkg{suffix}")
    cache = tmp_path / "cache"
    package = load_package(tar_path, cache_dir=cache)
    assert package.model_path.read_bytes() == b"fake onnx bytes"
    assert package.folder.is_relative_to(cache)
    assert load_package(tar_path, cache_dir=cache).folder == package.folder  # extracted once


def test_tar_with_one_top_level_folder(tmp_path):
    write_package(tmp_path / "seg-test-0.0.1", seg_manifest(), b"x")
    with tarfile.open(tmp_path / "p.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "seg-test-0.0.1", arcname="seg-test-0.0.1")
    assert load_package(tmp_path / "p.tar.gz", cache_dir=tmp_path / "cache").ref == "seg-test:0.0.1"


def test_tampered_tar_names_the_tar(tmp_path):
    write_package(tmp_path / "pkg", seg_manifest(), b"x")
    (tmp_path / "pkg" / MODEL_FILE).write_bytes(b"y")
    with tarfile.open(tmp_path / "p.tar", "w") as tar:
        for name in (MANIFEST_FILE, MODEL_FILE):
            tar.add(tmp_path / "pkg" / name, arcname=name)
    with pytest.raises(PackageError, match=r"p\.tar: checksum mismatch for model.onnx"):
        load_package(tmp_path / "p.tar", cache_dir=tmp_path / "cache")


def _tar_with(path, member, data=b"evil"):
    write_package(path.parent / "src", seg_manifest(), b"x")
    with tarfile.open(path, "w") as tar:
        for name in (MANIFEST_FILE, MODEL_FILE):
            tar.add(path.parent / "src" / name, arcname=name)
        if member.isfile():
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        else:
            tar.addfile(member)


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("../evil.txt", tarfile.REGTYPE, "escapes the package folder"),
        ("sub/../../evil.txt", tarfile.REGTYPE, "escapes the package folder"),
        ("/tmp/evil.txt", tarfile.REGTYPE, "escapes the package folder"),
        ("link", tarfile.SYMTYPE, "is a symbolic link"),
        ("hard", tarfile.LNKTYPE, "is a hard link"),
        ("fifo", tarfile.FIFOTYPE, "is a device or fifo"),
        (MODEL_FILE, tarfile.REGTYPE, "appears twice"),
    ],
)
def test_malicious_tar_members_are_refused(tmp_path, name, kind, message):
    member = tarfile.TarInfo(name)
    member.type = kind
    member.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
    _tar_with(tmp_path / "p.tar", member)
    with pytest.raises(PackageError, match=message):
        load_package(tmp_path / "p.tar", cache_dir=tmp_path / "cache" / "deep")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "cache" / "evil.txt").exists()
    assert not list((tmp_path / "cache" / "deep" / "packages").iterdir())  # nothing half-extracted left behind


def test_unreadable_tar_is_refused(tmp_path):
    (tmp_path / "p.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(PackageError, match="not a readable tar archive"):
        load_package(tmp_path / "p.tar.gz", cache_dir=tmp_path / "cache")


class Zeros(io.RawIOBase):
    """``size`` zero bytes, read without holding them: the body of a compression bomb."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.left)
        buffer[:count] = bytes(count)
        self.left -= count
        return count


def bomb_tar(path, size: int, extra_files: int = 0):
    """A signed-looking package gzip whose last member unpacks to ``size`` zero bytes."""
    write_package(path.parent / "src", seg_manifest(), b"x")
    with tarfile.open(path, "w:gz") as tar:
        for name in (MANIFEST_FILE, MODEL_FILE):
            tar.add(path.parent / "src" / name, arcname=name)
        for index in range(extra_files):
            tar.addfile(tarfile.TarInfo(f"extra-{index}"), io.BytesIO())
        big = tarfile.TarInfo("weights.bin")
        big.size = size
        tar.addfile(big, Zeros(size))
    return path


def test_a_compression_bomb_is_refused_before_anything_is_written(tmp_path):
    tar = bomb_tar(tmp_path / "bomb.tar.gz", 64 * 2**20)
    assert tar.stat().st_size < 2**20  # 64 MiB of zeros packs into well under 1 MiB
    with pytest.raises(PackageError, match=r"bomb\.tar\.gz: unpacks to more than 1 MiB \(packages\.max_unpacked_mib; "
                       r"refused at member 'weights\.bin' of 64\.0 MiB\)"):
        load_package(tar, cache_dir=tmp_path / "cache", limits=PackageSettings(max_unpacked_mib=1))
    assert not list((tmp_path / "cache" / "packages").iterdir())  # not one byte of it stayed


def test_archive_size_and_entry_count_are_limited(tmp_path):
    tar = bomb_tar(tmp_path / "p.tar.gz", 10, extra_files=5)
    with pytest.raises(PackageError, match=rf"archive of {tar.stat().st_size:,} bytes is over the limit of 0\.0001 MiB "
                       r"\(packages\.max_archive_mib\)"):
        load_package(tar, cache_dir=tmp_path / "cache", limits=PackageSettings(max_archive_mib=0.0001))
    assert not (tmp_path / "cache").exists()  # refused before extracting
    with pytest.raises(PackageError, match=r"more than 4 entries in the archive \(packages\.max_files\)"):
        load_package(tar, cache_dir=tmp_path / "cache", limits=PackageSettings(max_files=4))
    assert not list((tmp_path / "cache" / "packages").iterdir())


def test_a_tar_refused_after_extraction_leaves_nothing_in_the_cache(tmp_path):
    write_package(tmp_path / "pkg", seg_manifest(), b"x")
    (tmp_path / "pkg" / MODEL_FILE).write_bytes(b"y")
    with tarfile.open(tmp_path / "p.tar", "w") as tar:
        for name in (MANIFEST_FILE, MODEL_FILE):
            tar.add(tmp_path / "pkg" / name, arcname=name)
    with pytest.raises(PackageError, match="checksum mismatch"):
        load_package(tmp_path / "p.tar", cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache" / "packages").iterdir())
