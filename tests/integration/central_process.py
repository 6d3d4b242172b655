"""`edgeline central serve` as a real process on a free loopback port, for the tests that talk to
it over HTTP and through the `edgeline central` client commands."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from edgeline.services import free_port

CENTRAL_CLI = [sys.executable, "-m", "edgeline.cli", "central"]


def client_env(**extra: str) -> dict[str, str]:
    """This environment less any EDGELINE_CENTRAL_* of the caller's, 80 columns wide, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELINE_CENTRAL_")}
    return env | {"COLUMNS": "80"} | extra


def start_central(tmp_path: Path, site_yaml: str, *options: str, env: dict[str, str] | None = None,
                  timeout: float = 30.0, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """``central serve`` of ``site_yaml`` (written to ``tmp_path/site.yaml``) with ``options``, once its
    open ``/metrics`` answers: the process and its base URL. A central that exits or does not answer
    within ``timeout`` fails the test with its output. ``port``: a given one (default: a free one)."""
    (tmp_path / "site.yaml").write_text(site_yaml)
    port = port or free_port()
    server = subprocess.Popen([*CENTRAL_CLI, "serve", "-c", str(tmp_path / "site.yaml"), "--db",
                               f"sqlite:///{tmp_path / 'c.db'}", "--storage", str(tmp_path / "store"),
                               "--evidence-dir", str(tmp_path / "evidence"),
                               "--port", str(port), "--log-level", "warning", *options],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env or client_env())
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(f"{base}/metrics", timeout=1)
            return server, base
        except httpx.TransportError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"central did not come up: {server.communicate()[0]}")
            time.sleep(0.3)
