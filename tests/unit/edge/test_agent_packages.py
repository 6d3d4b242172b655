"""The edge agent only runs packages whose checksums and signature verify."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edge.agent import EdgeAgent
from edgeline.config import BUILTIN_PACKAGES, SiteConfig, from_dict
from models.package import PackageError


def site(tmp_path: Path, package: Path, require: bool = True) -> SiteConfig:
    return from_dict({
        "site": "s1",
        "models": {"seg": {"path": str(package)}},
        "signatures": {"require": require},
        "machines": [{"id": "m1", "cameras": [{"id": "c1", "models": ["seg"]}]}],
        "outbox": {"path": str(tmp_path / "outbox-{machine}.sqlite")},
        "metrics": {"port": 0},
    }, base_dir=tmp_path)


def copy_builtin(tmp_path: Path) -> Path:
    package = tmp_path / "seg"
    shutil.copytree(BUILTIN_PACKAGES / "seg-synth-int8", package)
    return package


def test_signed_builtin_package_loads(tmp_path: Path) -> None:
    agent = EdgeAgent(site(tmp_path, copy_builtin(tmp_path)), "m1")
    assert agent.seg_models["seg"].package.key_id is not None


def test_tampered_model_is_refused(tmp_path: Path) -> None:
    package = copy_builtin(tmp_path)
    with (package / "model.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(PackageError, match="checksum mismatch for model.onnx"):
        EdgeAgent(site(tmp_path, package), "m1")


def test_unsigned_package_is_refused_unless_signatures_are_off(tmp_path: Path) -> None:
    package = copy_builtin(tmp_path)
    manifest = json.loads((package / "manifest.json").read_text())
    del manifest["signature"]
    (package / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="is not signed"):
        EdgeAgent(site(tmp_path, package), "m1")
    agent = EdgeAgent(site(tmp_path, package, require=False), "m1")
    assert agent.seg_models["seg"].package.key_id is None
