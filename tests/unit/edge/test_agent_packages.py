"""The edge agent only runs packages whose checksums and signature verify, and runs native ones for
cameras of any size."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from edge.agent import EdgeAgent
from edgeline.config import SiteConfig, from_dict
from models.package import BUILTIN_PACKAGES, PackageError
from stream.messages import Result, parse_message


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
    assert agent.vision.seg_models["seg"].package.key_id is not None


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
    assert agent.vision.seg_models["seg"].package.key_id is None


def test_cameras_of_different_sizes_share_one_native_model(tmp_path: Path) -> None:
    """Three cameras, two resolutions (98 rows: not a multiple of the stride), one native package: one
    micro-batch (one infer() call, one session.run per size), each camera's mask at its own size and
    equal to what its frame gives alone."""
    from tests.tiny_segmentation import write_dark_block_package

    package = write_dark_block_package(tmp_path / "native")
    sizes = {"c1": (160, 120), "c2": (202, 98), "c3": (160, 120)}
    config = from_dict({
        "site": "s1", "models": {"seg": {"path": str(package.folder)}}, "signatures": {"require": False},
        "machines": [{"id": "m1", "cameras": [
            {"id": cam, "models": ["seg"], "resolution": list(size), "source": {"type": "synthetic", "seed": i}}
            for i, (cam, size) in enumerate(sizes.items())]}],
        "outbox": {"path": str(tmp_path / "outbox-{machine}.sqlite")}, "metrics": {"port": 0},
    }, base_dir=tmp_path)
    agent = EdgeAgent(config, "m1")
    try:
        for camera in agent.vision.cameras:
            camera.start()
        deadline = time.monotonic() + 10.0
        while any(camera.queue_depth() == 0 for camera in agent.vision.cameras):
            assert time.monotonic() < deadline, "the cameras captured no frame in 10 s"
            time.sleep(0.01)
        for camera in agent.vision.cameras:
            camera.stop()
            agent.vision.camera_counters[camera.id].snapshot_requested = True  # publish the mask with the result
        assert agent.vision.infer_once() == 3
        results = [m for m in (parse_message(p.payload) for p in agent.outbox.pending()) if isinstance(m, Result)]
        assert sorted(r.camera for r in results) == sorted(sizes)
        model = agent.vision.seg_models["seg"]
        labels = {"machine": "m1", "model": model.name}
        registry = agent.metrics.registry
        assert registry.get_sample_value("edgeline_edge_inference_batch_frames_count", labels) == 1
        assert registry.get_sample_value("edgeline_edge_inference_batch_frames_sum", labels) == 3
        frames = {camera.id: image for camera, image in zip(agent.vision.cameras, agent.vision.recent_frames, strict=True)}
        for result in results:
            width, height = sizes[result.camera]
            mask = result.frames[0].outputs[0].mask.decode()
            assert mask.shape == (height, width)
            assert 0 < mask.mean() < 1  # dark synthetic belt and brighter parts: a mask with both
            alone = model.infer([frames[result.camera]])[0] > model.postprocess.threshold
            np.testing.assert_array_equal(mask > 0, alone)
    finally:
        for camera in agent.vision.cameras:
            camera.stop()
        agent.outbox.close()
