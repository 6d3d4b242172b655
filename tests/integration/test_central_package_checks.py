"""What `edgeline central serve` (a real process on a real port) refuses to register, each with a
400 naming the reason: a signed package whose model.onnx does not load in ONNX Runtime, one whose
graph does not match its manifest, and a compression bomb (refused at ``packages.max_unpacked_mib``
before its big file is written). And `edgeline central upload` of a tampered folder: one line,
exit 1, no traceback."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from models.package import (BUILTIN_PACKAGES, MANIFEST_FILE, MODEL_FILE, TensorSpec, read_manifest, write_package,
                            write_package_tar)
from models.package.files import sign_package
from models.package.signing import generate_keypair, load_private_key
from tests.integration.central_process import CENTRAL_CLI, start_central
from tests.unit.models.package.test_files import Zeros

pytestmark = pytest.mark.integration
TOKEN = "a-long-enough-api-token"
CLI = CENTRAL_CLI
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def central(tmp_path: Path, mosquitto, unique_name: str) -> Iterator[str]:
    """``central serve`` trusting ``test.pub`` (this test's key), unpacking at most 16 MiB a package."""
    generate_keypair(tmp_path / "test.key", tmp_path / "test.pub")
    (tmp_path / "token").write_text(TOKEN + "\n")
    server, base = start_central(
        tmp_path, f"site: {unique_name}\nbroker: {{host: {mosquitto.host}, port: {mosquitto.port}}}\n"
        "signatures: {trusted_keys: [test.pub]}\npackages: {max_unpacked_mib: 16}\n",
        "--token-file", str(tmp_path / "token"))
    try:
        yield base
    finally:
        server.terminate()
        server.wait(10)


def signed(tmp_path: Path, name: str, onnx: bytes, **manifest_changes) -> bytes:
    """A package tar of the builtin fp32 manifest (changed as asked) around ``onnx``, signed with test.key."""
    manifest = read_manifest(BUILTIN_PACKAGES / "seg-synth-fp32").model_copy(update={"version": name,
                                                                                      **manifest_changes})
    write_package(tmp_path / name, manifest, onnx)
    sign_package(tmp_path / name, load_private_key(tmp_path / "test.key"))
    return write_package_tar(tmp_path / name, tmp_path / f"{name}.tar").read_bytes()


def test_central_registers_only_models_that_load_and_match_their_manifest(tmp_path, central):
    real = (BUILTIN_PACKAGES / "seg-synth-fp32" / MODEL_FILE).read_bytes()
    random_bytes = httpx.post(f"{central}/models", content=signed(tmp_path, "6.6.6", bytes(range(256)) * 256),
                              headers=AUTH)
    assert random_bytes.status_code == 400
    assert "model.onnx does not load in ONNX Runtime" in random_bytes.json()["detail"]
    assert "INVALID_PROTOBUF" in random_bytes.json()["detail"]
    renamed = signed(tmp_path, "6.6.7", real, inputs=[TensorSpec(name="frames", shape=["batch", 1, 128, 128])])
    mismatched = httpx.post(f"{central}/models", content=renamed, headers=AUTH)
    assert mismatched.status_code == 400 and mismatched.json()["detail"] == (
        "package refused: seg-synth:6.6.7: model.onnx does not match the manifest: inputs are ['image'] in the "
        "graph, ['frames'] in the manifest")
    good = httpx.post(f"{central}/models", content=signed(tmp_path, "6.6.8", real), headers=AUTH)
    assert good.status_code == 201, good.text
    assert [p["id"] for p in httpx.get(f"{central}/models", headers=AUTH).json()] == ["seg-synth-6.6.8-fp32"]


def test_central_refuses_a_compression_bomb_at_its_limit(tmp_path, central):
    bomb = tmp_path / "bomb.tar.gz"
    with tarfile.open(bomb, "w:gz") as tar:
        for name in (MANIFEST_FILE, MODEL_FILE):
            tar.add(BUILTIN_PACKAGES / "seg-synth-int8" / name, arcname=name)
        big = tarfile.TarInfo("weights.bin")
        big.size = 1 << 30
        tar.addfile(big, Zeros(big.size))
    started = time.monotonic()
    refused = httpx.post(f"{central}/models", content=bomb.read_bytes(), headers=AUTH, timeout=60)
    seconds = time.monotonic() - started
    assert refused.status_code == 400, refused.text
    assert ("unpacks to more than 16 MiB (packages.max_unpacked_mib; refused at member 'weights.bin' of 1024.0 MiB)"
            in refused.json()["detail"])
    assert seconds < 5, f"{bomb.stat().st_size} bytes of gzip took {seconds:.1f} s to refuse"


def test_uploading_a_tampered_folder_prints_one_line(tmp_path, central):
    tampered = tmp_path / "tampered"
    shutil.copytree(BUILTIN_PACKAGES / "seg-synth-int8", tampered)
    (tampered / MODEL_FILE).write_bytes(b"not the signed model")
    upload = subprocess.run([*CLI, "upload", str(tampered), "--url", central, "--token-file", str(tmp_path / "token")],
                            capture_output=True, text=True, timeout=60)
    assert upload.returncode == 1 and upload.stdout == ""
    assert upload.stderr.startswith(f"package refused: {tampered}: checksum mismatch for model.onnx (manifest ")
    assert "Traceback" not in upload.stderr and len(upload.stderr.strip().splitlines()) == 1
    missing = subprocess.run([*CLI, "upload", str(tmp_path / "nowhere"), "--url", central], capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 1 and "no such package folder or file" in missing.stderr
    assert "Traceback" not in missing.stderr
