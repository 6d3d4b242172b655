"""The central API in-process (FastAPI's TestClient over the real app), on a real SQLite file and
on a real PostgreSQL server: the write token for writes, the read token (or the write token) for
reads, signed download links, signed uploads only, downloads with their checksum, clear 4xx on bad
input."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import time

import pytest
from fastapi.testclient import TestClient

from central.api import create_api
from central.registry import Registry
from central.rollouts import RolloutManager
from central.tokens import DownloadLinks
from models.package import BUILTIN_PACKAGES, write_package_tar
from models.package.signing import builtin_trusted_keys, key_id
from stream.mqtt import MqttClient, MqttSettings

BUILTIN_KEY_ID = key_id(builtin_trusted_keys()[0])
"""The key that signs the builtin packages (models/packages/trusted.pub)."""

TOKEN = "s3cret-token-of-the-plant"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
READ_TOKEN = "read-only-token-of-the-plant"
READ = {"Authorization": f"Bearer {READ_TOKEN}"}


@pytest.fixture(params=["sqlite", "postgresql"])
def client(request, tmp_path):
    url = (f"sqlite:///{tmp_path / 'central.db'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres").new_database())
    registry = Registry(url, tmp_path / "storage", builtin_trusted_keys())
    with TestClient(create_api(registry, TOKEN, read_token=READ_TOKEN)) as client:
        yield client
    registry.engine.dispose()


@pytest.fixture
def package_tar(tmp_path):
    return write_package_tar(BUILTIN_PACKAGES / "seg-synth-int8", tmp_path / "seg-synth-int8.tar").read_bytes()


def test_upload_list_inspect_download(client, package_tar):
    created = client.post("/models", content=package_tar, headers=AUTH)
    assert created.status_code == 201, created.text
    package_id = created.json()["id"]
    assert package_id == "seg-synth-1.0.0-int8" and created.json()["key_id"] == BUILTIN_KEY_ID
    assert [p["id"] for p in client.get("/models", headers=READ).json()] == [package_id]
    assert client.get(f"/models/{package_id}", headers=AUTH).json()["manifest"]["precision"] == "int8"
    download = client.get(f"/models/{package_id}/download", headers=READ)
    assert download.content == package_tar
    assert download.headers["X-Checksum-Sha256"] == hashlib.sha256(package_tar).hexdigest()
    again = client.post("/models", content=package_tar, headers=AUTH)
    assert again.status_code == 409 and "already registered" in again.json()["detail"]


def test_writes_need_the_token(client, package_tar):
    missing = client.post("/models", content=package_tar)
    assert missing.status_code == 401 and "Bearer" in missing.json()["detail"]
    wrong = client.put("/machines/m01", json={"site": "plant"}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403
    assert client.put("/machines/m01", json={"site": "plant"}, headers=READ).status_code == 403  # reads only


@pytest.mark.parametrize("path", ["/models", "/models/seg-synth-1.0.0-int8", "/models/seg-synth-1.0.0-int8/download",
                                  "/machines", "/machines/m01", "/docs", "/openapi.json"])
def test_reads_need_the_read_or_the_write_token(client, package_tar, path):
    """Issue 13 defect 14: no read is open; a browser may give the token as basic auth's password."""
    client.post("/models", content=package_tar, headers=AUTH)
    client.put("/machines/m01", json={"site": "plant"}, headers=AUTH)
    missing = client.get(path)
    assert missing.status_code == 401 and "read token" in missing.json()["detail"]
    assert "Basic" in missing.headers["WWW-Authenticate"]
    assert client.get(path, headers={"Authorization": "Bearer not-the-token"}).status_code == 403
    basic = base64.b64encode(f"anyone:{READ_TOKEN}".encode()).decode()
    for headers in (READ, AUTH, {"Authorization": f"Basic {basic}"}):
        assert client.get(path, headers=headers).status_code == 200, headers
    assert client.get("/metrics").status_code == 200  # open unless served apart


def test_a_signed_link_downloads_one_package_until_it_expires(client, package_tar):
    client.post("/models", content=package_tar, headers=AUTH)
    links, now = DownloadLinks(TOKEN, ttl_s=60), time.time()
    link = f"/models/seg-synth-1.0.0-int8/download?{links.query('seg-synth-1.0.0-int8', now)}"
    assert client.get(link).content == package_tar
    expired = client.get(f"/models/seg-synth-1.0.0-int8/download?{links.query('seg-synth-1.0.0-int8', now - 61)}")
    assert expired.status_code == 403 and "expired or is not valid" in expired.json()["detail"]
    other = client.get(f"/models/seg-synth-1.0.0-fp32/download?{links.query('seg-synth-1.0.0-int8', now)}")
    assert other.status_code == 403
    forged = DownloadLinks("another-servers-token-0123").query("seg-synth-1.0.0-int8", now)
    assert client.get(f"/models/seg-synth-1.0.0-int8/download?{forged}").status_code == 403


def test_tampered_and_unsigned_packages_are_refused(client, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(BUILTIN_PACKAGES / "seg-synth-int8", tampered)
    manifest = json.loads((tampered / "manifest.json").read_text())
    manifest["version"] = "6.6.6"
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    tar = write_package_tar(tampered, tmp_path / "tampered.tar").read_bytes()
    refused = client.post("/models", content=tar, headers=AUTH)
    assert refused.status_code == 400 and "signature" in refused.json()["detail"]
    junk = client.post("/models", content=b"not a tar at all", headers=AUTH)
    assert junk.status_code == 400 and junk.json()["detail"].startswith("package refused")


def test_machines_registry_and_bad_input(client, package_tar):
    client.post("/models", content=package_tar, headers=AUTH)
    put = client.put("/machines/m01", json={"site": "plant", "line": "L1", "cameras": ["c1"],
                                            "models": {"seg": "seg-synth-1.0.0-int8"}}, headers=AUTH)
    assert put.status_code == 200 and put.json()["models"] == {"seg": "seg-synth-1.0.0-int8"}
    assert [m["id"] for m in client.get("/machines", headers=READ).json()] == ["m01"]
    unknown = client.put("/machines/m02", json={"site": "plant", "models": {"seg": "nope"}}, headers=AUTH)
    assert unknown.status_code == 404 and "no package 'nope'" in unknown.json()["detail"]
    bad = client.put("/machines/m 03", json={"site": "bad site/"}, headers=AUTH)
    assert bad.status_code == 422
    assert client.get("/machines/m09", headers=READ).status_code == 404


@pytest.fixture(params=["sqlite", "postgresql"])
def with_rollouts(request, tmp_path, package_tar):
    """The API with its rollout routes (a manager that is never started: no request here reaches MQTT),
    seg-synth int8 uploaded and m01, m02 in the fleet."""
    url = (f"sqlite:///{tmp_path / 'central.db'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres").new_database())
    registry = Registry(url, tmp_path / "storage", builtin_trusted_keys())
    manager = RolloutManager("plant", registry, MqttClient(MqttSettings(), "central-plant"), "http://127.0.0.1:8080")
    with TestClient(create_api(registry, TOKEN, manager)) as client:
        assert client.post("/models", content=package_tar, headers=AUTH).status_code == 201
        registry.sync_site("plant", {"m01": ("L1", ["c1"]), "m02": ("L1", ["c1"])})
        yield client
    registry.engine.dispose()


def test_a_rollout_to_an_unknown_machine_lists_the_known_ones(with_rollouts):
    body = {"package": "seg-synth-1.0.0-int8", "model": "seg", "machines": ["m01", "m09"]}
    unknown = with_rollouts.post("/rollouts", json=body, headers=AUTH)
    assert unknown.status_code == 404
    assert unknown.json()["detail"] == "no machine m09 in the fleet; known machines: m01, m02"
    silent = with_rollouts.post("/rollouts", json=body | {"machines": ["m01"]}, headers=AUTH)
    assert silent.status_code == 409 and silent.json()["detail"].startswith(
        "m01 reported no running package for 'seg' since central started")


def test_an_unknown_rollout_operation_lists_the_valid_ones(with_rollouts):
    refused = with_rollouts.post("/rollouts/abc/stop", headers=AUTH)
    assert refused.status_code == 422
    assert "'pause', 'resume' or 'abort'" in refused.json()["detail"][0]["msg"]
    assert with_rollouts.post("/rollouts/abc/pause", headers=AUTH).status_code == 404  # a valid verb, no such rollout
