"""Dashboards as code: the committed JSON is what the code builds; every query names metrics that
real scrapes of the agent, bridge, worker and central contain (and promtool finds those pages
clean); provisioning talks to Grafana's HTTP API (a fake Grafana here: none can run on this box)."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from central.api import create_api
from central.dashboards import DASHBOARDS, build, metric_names, provision
from central.registry import Registry
from edge.agent import EdgeAgent
from edgeline.services import free_port
from models.signing import builtin_trusted_keys
from stream.app import WorkerMetrics
from stream.bridge import BridgeMetrics
from tests.conftest import REPO_ROOT, edge_site

pytestmark = pytest.mark.integration
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "unknown": ("",)}


def scraped_names(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
    return names


def promtool_clean(text: str) -> None:
    if shutil.which("promtool") is None:
        return
    done = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_committed_dashboards_are_the_built_ones():
    for spec in DASHBOARDS:
        committed = json.loads((REPO_ROOT / "deploy" / "grafana" / "dashboards" / f"{spec.uid}.json").read_text())
        assert committed == build(spec), f"{spec.uid}: run `edgeline grafana build`"


def test_every_query_names_metrics_that_the_scrapes_contain(mosquitto, unique_name, tmp_path):
    config = edge_site(mosquitto, unique_name, tmp_path,
                       [{"id": "m1", "cameras": [{"id": "c1", "models": ["seg"], "fps": 10}],
                         "sensors": [{"id": "pump", "model": "pump", "source": {"type": "synthetic"}}]}],
                       {"seg": {"path": "builtin:seg-synth-int8"},
                        "pump": {"path": "builtin:anomaly-skab", "profile": "fast-start"}})
    agent = EdgeAgent(config, "m1", base_dir=tmp_path, heartbeat_s=1.0)
    agent.start()
    try:
        time.sleep(2.0)
        edge = urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=5).read().decode()
    finally:
        agent.stop()
    registry = Registry(f"sqlite:///{tmp_path / 'c.db'}", tmp_path / "store", builtin_trusted_keys())
    with TestClient(create_api(registry, "x" * 20)) as client:
        central = client.get("/metrics").text
    pages = {"edge": edge, "bridge": generate_latest(BridgeMetrics().registry).decode(),
             "worker": generate_latest(WorkerMetrics().registry).decode(), "central": central}
    available: set[str] = set()
    for name, text in pages.items():
        promtool_clean(text)
        available |= scraped_names(text)
    for spec in DASHBOARDS:
        for panel in spec.panels:
            missing = metric_names(panel.expr) - available
            assert not missing, f"{spec.uid} / {panel.title}: {sorted(missing)} in no scrape"


class FakeGrafana:
    """Stands in for a Grafana server (none can run here): records the API calls provisioning makes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                fake.calls.append(("GET", self.path, {}))
                self._answer(404, {"message": "Data source not found"})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.calls.append(("POST", self.path, body | {"_auth": self.headers.get("Authorization")}))
                self._answer(200, {"status": "success", "uid": body.get("dashboard", {}).get("uid", "x")})

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"


def test_provision_creates_the_datasource_and_every_dashboard():
    grafana = FakeGrafana()
    try:
        uids = provision(grafana.url, "service-account-token", "http://prometheus:9090")
    finally:
        grafana.server.shutdown()
    posts = [(path, body) for method, path, body in grafana.calls if method == "POST"]
    assert posts[0][0] == "/api/datasources" and posts[0][1]["uid"] == "edgeline-prometheus"
    assert [body["dashboard"]["uid"] for path, body in posts[1:] if path == "/api/dashboards/db"] == uids
    assert len(uids) == 5 and all(body["_auth"] == "Bearer service-account-token" for _, body in posts)


def test_prometheus_config_is_valid():
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (Debian: apt install prometheus)")
    done = subprocess.run(["promtool", "check", "config", str(Path(REPO_ROOT) / "deploy" / "prometheus.yml")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_real_prometheus_scrapes_the_agent_and_central(mosquitto, unique_name, tmp_path):
    """Debian's prometheus scraping a live agent and central: both targets up, the series there."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (Debian: apt install prometheus)")
    config = edge_site(mosquitto, unique_name, tmp_path, [{"id": "m1", "cameras": [{"id": "c1", "models": ["seg"]}]}],
                       {"seg": {"path": "builtin:seg-synth-int8"}})
    agent = EdgeAgent(config, "m1", base_dir=tmp_path, heartbeat_s=1.0)
    agent.start()
    central_port = free_port()
    registry = Registry(f"sqlite:///{tmp_path / 'c.db'}", tmp_path / "store", builtin_trusted_keys())
    server = uvicorn.Server(uvicorn.Config(create_api(registry, "x" * 20), host="127.0.0.1", port=central_port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\nscrape_configs:\n"
        f"  - {{job_name: edge, static_configs: [{{targets: ['127.0.0.1:{agent.metrics_port}']}}]}}\n"
        f"  - {{job_name: central, static_configs: [{{targets: ['127.0.0.1:{central_port}']}}]}}\n")
    prometheus = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, up, series = time.monotonic() + 40, {}, []
        while time.monotonic() < deadline:
            try:
                api = f"http://127.0.0.1:{prom_port}/api/v1/query?query="
                up = {r["metric"]["job"]: r["value"][1]
                      for r in json.load(urllib.request.urlopen(api + "up", timeout=2))["data"]["result"]}
                series = json.load(urllib.request.urlopen(api + "edgeline_edge_frames_inferred_total",
                                                          timeout=2))["data"]["result"]
            except OSError:
                pass
            if up == {"edge": "1", "central": "1"} and series:
                break
            time.sleep(0.5)
        assert up == {"edge": "1", "central": "1"}, up
        assert series and series[0]["metric"]["camera"] == "c1"
    finally:
        prometheus.terminate()
        prometheus.wait(10)
        server.should_exit = True
        agent.stop()
