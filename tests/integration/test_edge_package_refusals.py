"""What a running agent (real Mosquitto, real ONNX Runtime, packages over real HTTP) refuses to
download or load: URLs that are not http(s) or not under ``packages.download_urls`` (nothing read
or written), a redirect out of them, a download past ``packages.max_archive_mib``, a compression
bomb (refused at the limit before its big file is written), a signed package whose model.onnx is
not a model. Every refusal is a ``model_load_failed`` or ``shadow_failed`` event naming the
reason, and leaves nothing in the downloads or the package cache; a good package from the same
server still loads."""

from __future__ import annotations

import hashlib
import http.server
import io
import shutil
import tarfile
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from edge.agent import EdgeAgent
from models.package import (BUILTIN_PACKAGES, CACHE_ENV, MANIFEST_FILE, MODEL_FILE, read_manifest, write_package,
                            write_package_tar)
from models.package.files import sign_package
from models.package.signing import generate_keypair
from stream.topics import site_filter
from tests.conftest import edge_site
from tests.integration.test_edge_model_swap import send_and_wait
from tests.unit.models.package.test_files import Zeros

pytestmark = pytest.mark.integration


class PackageServer(http.server.SimpleHTTPRequestHandler):
    """Serves the files of a folder; ``/models/away`` redirects out of ``/models/``."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/models/away":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/other/good.tar")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder and the base URL it is served at (``<base>/models/<file>``)."""
    root = tmp_path / "www"
    (root / "models").mkdir(parents=True)
    (root / "other").mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(PackageServer, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, name="package-server", daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def bomb(path: Path, size: int) -> Path:
    """The builtin int8 package plus a ``size``-byte file of zeros, gzipped (a few KiB per 10 MiB)."""
    with tarfile.open(path, "w:gz") as tar:
        for name in (MANIFEST_FILE, MODEL_FILE):
            tar.add(BUILTIN_PACKAGES / "seg-synth-int8" / name, arcname=name)
        big = tarfile.TarInfo("weights.bin")
        big.size = size
        tar.addfile(big, Zeros(size))
    return path


def not_a_model(tmp_path: Path) -> tuple[Path, Path]:
    """A package correctly signed by a key of this test's own whose model.onnx is random bytes."""
    manifest = read_manifest(BUILTIN_PACKAGES / "seg-synth-fp32").model_copy(update={"version": "6.6.6"})
    folder = tmp_path / "random-onnx"
    write_package(folder, manifest, bytes(range(256)) * 256)
    private, public = generate_keypair(tmp_path / "test.key", tmp_path / "test.pub")
    sign_package(folder, private)
    return folder, tmp_path / "test.pub"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_agent_refuses_bad_urls_and_packages_and_keeps_none(mosquitto, mqtt_probe, unique_name, tmp_path,
                                                                served, monkeypatch):
    root, base = served
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    random_onnx, public_key = not_a_model(tmp_path)
    write_package_tar(random_onnx, root / "models" / "random.tar")
    write_package_tar(BUILTIN_PACKAGES / "seg-synth-fp32", root / "models" / "good.tar")
    bomb(root / "models" / "bomb.tar", 256 * 2**20)
    shutil.copy(root / "models" / "good.tar", root / "other" / "good.tar")
    (root / "models" / "huge.tar").write_bytes(bytes(3 * 2**20))
    site = unique_name
    config = edge_site(mosquitto, site, tmp_path, [{"id": "m1", "cameras": [{"id": "c1", "models": ["seg"],
                                                                               "fps": 5}]}],
                       {"seg": {"path": "builtin:seg-synth-int8"}}, signatures={"trusted_keys": [str(public_key)]},
                       packages={"download_urls": [f"{base}/models/"], "max_unpacked_mib": 64, "max_archive_mib": 1})
    probe = mqtt_probe(mosquitto)
    probe.subscribe(site_filter(site))
    agent = EdgeAgent(config, "m1", base_dir=tmp_path, heartbeat_s=1.0)
    agent.start()
    downloads, cache = tmp_path / "cache" / "downloads" / "m1", tmp_path / "cache" / "packages"

    def load(url: str, sha: str, command: str = "load_model"):
        return send_and_wait(probe, site, command, {"model": "seg", "url": url, "sha256": sha})

    try:
        passwd = load("file:///etc/passwd", hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest())
        assert passwd.name == "model_load_failed" and passwd.level == "error"
        assert "refused to download 'file:///etc/passwd': only http:// and https:// URLs" in passwd.text
        assert not downloads.exists()  # nothing read, nothing written
        elsewhere = load(f"{base}/other/good.tar", sha256(root / "other" / "good.tar"))
        assert elsewhere.name == "model_load_failed" and "not under packages.download_urls" in elsewhere.text
        away = load(f"{base}/models/away", sha256(root / "other" / "good.tar"))
        assert away.name == "model_load_failed" and f"'{base}/other/good.tar': not under packages" in away.text
        assert "redirected to" in away.text and list(downloads.iterdir()) == []

        huge = load(f"{base}/models/huge.tar", sha256(root / "models" / "huge.tar"))
        assert huge.name == "model_load_failed"
        assert "huge.tar stopped: over 1 MiB (packages.max_archive_mib)" in huge.text
        refused = load(f"{base}/models/bomb.tar", sha256(root / "models" / "bomb.tar"))
        assert refused.name == "model_load_failed"
        assert "unpacks to more than 64 MiB (packages.max_unpacked_mib; refused at member 'weights.bin'" in refused.text
        shadow = load(f"{base}/models/bomb.tar", sha256(root / "models" / "bomb.tar"), "shadow_model")
        assert shadow.name == "shadow_failed" and "unpacks to more than 64 MiB" in shadow.text
        broken = load(f"{base}/models/random.tar", sha256(root / "models" / "random.tar"))
        assert broken.name == "model_load_failed" and "INVALID_PROTOBUF" in broken.text
        assert list(downloads.iterdir()) == [] and list(cache.iterdir()) == []  # every refused package is gone

        good = load(f"{base}/models/good.tar", sha256(root / "models" / "good.tar"))
        assert good.name == "model_loaded" and agent.vision.seg_models["seg"].package_id == "seg-synth-1.0.0-fp32"
        assert [p.name for p in downloads.iterdir()] == [f"{sha256(root / 'models' / 'good.tar')}.tar"]
    finally:
        agent.stop()
