"""Central's API on a real port (uvicorn in this process) stays responsive while an upload is
verified: extracting, hashing and loading a package of up to 512 MiB runs off the event loop, so
another client's request is answered meanwhile, and the upload then completes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn

from central.api import create_api
from central.registry import Registry, StoredPackage
from edgeline.services import free_port
from models.package import BUILTIN_PACKAGES, write_package_tar
from models.package.signing import builtin_trusted_keys

pytestmark = pytest.mark.integration
TOKEN = "upload-test-token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class HeldRegistry(Registry):
    """A real registry whose verification of an upload waits, once started, until the test lets it
    go on: the upload is held in the middle of being verified for as long as the test needs."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.verifying = threading.Event()
        self.release = threading.Event()

    def add_package(self, tar_bytes: bytes) -> StoredPackage:
        self.verifying.set()
        assert self.release.wait(30), "the test never released the upload"
        return super().add_package(tar_bytes)


@pytest.fixture
def central(tmp_path: Path) -> Iterator[tuple[str, HeldRegistry]]:
    port = free_port()
    registry = HeldRegistry(f"sqlite:///{tmp_path / 'central.db'}", tmp_path / "store", builtin_trusted_keys())
    server = uvicorn.Server(uvicorn.Config(create_api(registry, TOKEN), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", registry
    registry.release.set()
    server.should_exit = True
    thread.join(10)
    registry.engine.dispose()


def test_other_requests_are_answered_while_an_upload_is_verified(tmp_path, central):
    base, registry = central
    tar = write_package_tar(BUILTIN_PACKAGES / "seg-synth-int8", tmp_path / "p.tar").read_bytes()
    with ThreadPoolExecutor(1) as pool:
        upload = pool.submit(httpx.post, f"{base}/models", content=tar, headers=AUTH, timeout=60)
        assert registry.verifying.wait(20), "the upload never reached verification"
        # Verification is under way (and held): the event loop must still serve other requests.
        listed = httpx.get(f"{base}/models", headers=AUTH, timeout=5)
        assert listed.status_code == 200 and listed.json() == []
        assert not upload.done()
        registry.release.set()
        created = upload.result(timeout=60)
    assert created.status_code == 201, created.text
    assert [p["id"] for p in httpx.get(f"{base}/models", headers=AUTH, timeout=5).json()] == [created.json()["id"]]
