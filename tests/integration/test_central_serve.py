"""`edgeline central serve` as a real process on a real port, and the `edgeline central` client
commands against it: upload a signed package with the token, refuse one without it, inspect and
download it back, register and list machines, list rollouts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx

from edgeline.config import BUILTIN_PACKAGES
from edgeline.services import free_port
from models.package import write_package_tar


def test_central_serves_the_model_registry_over_http(tmp_path, mosquitto):
    (tmp_path / "site.yaml").write_text(f"site: plant\nbroker: {{host: {mosquitto.host}, port: {mosquitto.port}}}\n"
                                        "machines: [{id: m01, line: line-1, cameras: [{id: c1}, {id: c2}]}]\n")
    (tmp_path / "token").write_text("a-long-enough-api-token\n")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "edgeline.cli", "central", "serve", "-c", str(tmp_path / "site.yaml"),
                               "--token-file", str(tmp_path / "token"), "--db", f"sqlite:///{tmp_path / 'c.db'}",
                               "--storage", str(tmp_path / "store"), "--port", str(port), "--log-level", "warning"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{base}/models", timeout=1).raise_for_status()
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline, "central did not come up"
                time.sleep(0.3)
        tar = write_package_tar(BUILTIN_PACKAGES / "seg-synth-fp32", tmp_path / "p.tar").read_bytes()
        assert httpx.post(f"{base}/models", content=tar).status_code == 401
        created = httpx.post(f"{base}/models", content=tar, headers={"Authorization": "Bearer a-long-enough-api-token"})
        assert created.status_code == 201, created.text
        assert httpx.get(f"{base}/models/{created.json()['id']}/download").content == tar
        assert httpx.get(f"{base}/openapi.json").json()["info"]["title"] == "Edgeline central"
        (m01,) = httpx.get(f"{base}/machines").json()  # the site file's machines, registered at start
        assert (m01["id"], m01["site"], m01["line"], m01["cameras"], m01["status"]) == (
            "m01", "plant", "line-1", ["c1", "c2"], "unknown")
        cli = [sys.executable, "-m", "edgeline.cli", "central"]
        listed = subprocess.run([*cli, "models", "--url", base], capture_output=True, text=True, check=True)
        assert created.json()["id"] in listed.stdout
        upload = subprocess.run([*cli, "upload", str(BUILTIN_PACKAGES / "seg-synth-int8"), "--url", base,
                                 "--token-file", str(tmp_path / "token")], capture_output=True, text=True)
        assert upload.returncode == 0 and "registered seg-synth-1.0.0-int8" in upload.stdout, upload.stderr
        again = subprocess.run([*cli, "upload", str(BUILTIN_PACKAGES / "seg-synth-int8"), "--url", base,
                                "--token-file", str(tmp_path / "token")], capture_output=True, text=True)
        assert again.returncode == 1 and "409" in again.stderr and "already registered" in again.stderr
        inspected = subprocess.run([*cli, "model", "seg-synth-1.0.0-int8", "--url", base], capture_output=True,
                                   text=True, check=True)
        assert json.loads(inspected.stdout)["manifest"]["precision"] == "int8"
        fetched = subprocess.run([*cli, "download", "seg-synth-1.0.0-int8", "--out", str(tmp_path), "--url", base],
                                 capture_output=True, text=True, check=True)
        assert "wrote" in fetched.stdout
        assert (tmp_path / "seg-synth-1.0.0-int8.tar").read_bytes() == httpx.get(
            f"{base}/models/seg-synth-1.0.0-int8/download").content
        registered = subprocess.run([*cli, "register-machine", "m02", "--site", "plant", "--line", "line-2",
                                     "--cameras", "top,side", "--url", base, "--token-file", str(tmp_path / "token")],
                                    capture_output=True, text=True)
        assert registered.returncode == 0 and "machine m02: site plant, line line-2, 2 cameras" in registered.stdout
        unauthorised = subprocess.run([*cli, "register-machine", "m03", "--site", "plant", "--url", base],
                                      capture_output=True, text=True)
        assert unauthorised.returncode == 1 and "401" in unauthorised.stderr
        fleet = subprocess.run([*cli, "machines", "--url", base], capture_output=True, text=True, check=True,
                               env=os.environ | {"COLUMNS": "200"})
        assert "m01" in fleet.stdout and "line-2" in fleet.stdout and "top, side" in fleet.stdout
        listed_rollouts = subprocess.run([*cli, "rollouts", "--url", base], capture_output=True, text=True, check=True)
        assert "rollout" in listed_rollouts.stdout and httpx.get(f"{base}/rollouts").json() == []
        refused = subprocess.run([*cli, "rollout", "--package", "seg-synth-1.0.0-int8", "--model", "seg",
                                  "--machines", "m01", "--url", base, "--token-file", str(tmp_path / "token")],
                                 capture_output=True, text=True)  # the rollout API is live; m01 never reported
        assert refused.returncode == 1 and "409" in refused.stderr and "report one running package" in refused.stderr
    finally:
        server.terminate()
        server.wait(10)
