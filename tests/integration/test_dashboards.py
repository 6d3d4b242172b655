"""Dashboards as code: the committed JSON is what the code builds; a real Prometheus scrapes every
process, every page is promtool-clean, and every dashboard query names metrics those pages
contain and runs in that Prometheus; provisioning talks to Grafana's HTTP API (a fake Grafana
here: none can run on this box)."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from central.alerts import AlertStore
from central.api import create_api
from central.dashboards import DASHBOARDS, build, metric_names, provision
from central.evidence import EvidenceArchive
from central.registry import Registry
from central.rollouts import RolloutManager
from edge.agent import EdgeAgent
from edgeline.services import free_port
from models.package.signing import builtin_trusted_keys
from stream.bridge import MqttKafkaBridge
from stream.embedded import EmbeddedRulesRunner
from stream.mqtt import MqttClient, MqttSettings
from stream.settings import mqtt_settings
from tests.conftest import REPO_ROOT, service_unavailable
from tests.integration.streaming import WorkerProcess, write_site

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


def test_the_dashboards_link_to_the_operator_console():
    """Every dashboard links to the console; the alert panels to its alerts, and the per-camera
    defect panel's series each to their camera's page (labels filled in by Grafana)."""
    links: dict[str, str] = {}
    for spec in DASHBOARDS:
        built = build(spec)
        assert [(link["title"], link["url"]) for link in built["links"]] == [("Operator console", "${console}/console")]
        assert "console" in {variable["name"] for variable in built["templating"]["list"]}
        for panel in built["panels"]:
            for link in [*panel.get("links", []), *panel["fieldConfig"]["defaults"].get("links", [])]:
                links[panel["title"]] = link["url"]
    assert links["Alerts raised per minute"] == links["Standing alarms"] == "${console}/console/alerts"
    assert links["Defect frames per minute per camera"] == (
        "${console}/console/cameras/${__field.labels.machine}/${__field.labels.camera}")


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


def test_a_real_prometheus_scrapes_every_process_and_runs_every_dashboard_query(mosquitto, kafka, unique_name,
                                                                                  tmp_path):
    """Debian's prometheus scraping a live edge agent, the bridge, a Kafka worker (a process), the
    embedded rules engine and central (with its rollout manager): every target up, every page
    promtool-clean, every metric a dashboard query names is on some page, and Prometheus runs
    every query without an error."""
    binary = shutil.which("prometheus")
    if binary is None:
        service_unavailable("prometheus not installed (Debian: apt install prometheus)")
    path, site = write_site(tmp_path, unique_name, mosquitto, kafka, [], [
        {"id": "m1", "cameras": [{"id": "c1", "models": ["seg"], "fps": 10}],
         "sensors": [{"id": "pump", "model": "pump", "source": {"type": "synthetic"}}]}],
        sections={"models": {"seg": {"path": "builtin:seg-synth-int8"},
                             "pump": {"path": "builtin:anomaly-skab", "profile": "fast-start"}},
                  "outbox": {"path": str(tmp_path / "{machine}.sqlite")}, "metrics": {"port": 0}})
    with ExitStack() as running:
        agent = EdgeAgent(site, "m1", base_dir=tmp_path, heartbeat_s=1.0)
        agent.start()
        running.callback(agent.stop)
        bridge = MqttKafkaBridge(site.site, mqtt_settings(site.broker), site.stream.kafka,
                                 topics=site.stream.topics(), partitions=site.stream.partitions)
        bridge.start(metrics_port=0)
        running.callback(bridge.stop)
        worker = WorkerProcess(path, tmp_path / "worker").start()
        running.callback(worker.stop)
        rules = EmbeddedRulesRunner(site.site, site.rules, MqttClient(mqtt_settings(site.broker), f"{unique_name}-r"))
        rules.start(metrics_port=0)
        running.callback(rules.stop)
        central_port = serve_central(running, site.site, mqtt_settings(site.broker), tmp_path)
        targets = {"edge": agent.metrics_port, "bridge": bridge.metrics_port, "worker": worker.metrics_port,
                   "rules": rules.metrics_port, "central": central_port}
        prometheus = start_prometheus(running, binary, targets, tmp_path)
        worker.wait_consuming()
        up = wait_until_up(prometheus, set(targets))
        assert up == dict.fromkeys(targets, "1"), up
        available: set[str] = set()
        for job, port in targets.items():
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            promtool_clean(text)
            available |= scraped_names(text)
        for spec in DASHBOARDS:
            for panel in spec.panels:
                for query in panel.queries:
                    missing = metric_names(query.expr) - available
                    assert not missing, f"{spec.uid} / {panel.title}: {sorted(missing)} in no scrape"
                    answer = prom_query(prometheus, query.expr.replace("$machine", ".*"))
                    assert answer["status"] == "success", (spec.uid, panel.title, answer)
        frames = prom_query(prometheus, "edgeline_edge_frames_inferred_total")["data"]["result"]
        assert frames and frames[0]["metric"]["camera"] == "c1"


def serve_central(running: ExitStack, site: str, mqtt: MqttSettings, tmp_path: Path) -> int:
    port = free_port()
    registry = Registry(f"sqlite:///{tmp_path / 'c.db'}", tmp_path / "store", builtin_trusted_keys())
    manager = RolloutManager(site, registry, MqttClient(mqtt, f"{site}-central"), f"http://127.0.0.1:{port}")
    manager.start()
    running.callback(manager.stop)
    evidence = EvidenceArchive(registry.engine, tmp_path / "evidence", max_bytes=10**9, max_age_s=86_400)
    alerts = AlertStore(registry.engine, registry.line_of)
    api = create_api(registry, "x" * 20, manager, evidence=evidence, alerts=alerts)
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    running.callback(lambda: (setattr(server, "should_exit", True), thread.join(10)))
    return port


def start_prometheus(running: ExitStack, binary: str, targets: dict[str, int], tmp_path: Path) -> str:
    port = free_port()
    jobs = "".join(f"  - {{job_name: {job}, static_configs: [{{targets: ['127.0.0.1:{target}']}}]}}\n"
                   for job, target in targets.items())
    (tmp_path / "prometheus.yml").write_text(f"global: {{scrape_interval: 1s}}\nscrape_configs:\n{jobs}")
    process = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    running.callback(lambda: (process.terminate(), process.wait(10)))
    return f"http://127.0.0.1:{port}"


def prom_query(prometheus: str, expr: str) -> dict:
    url = f"{prometheus}/api/v1/query?query={urllib.parse.quote(expr)}"
    try:
        return json.load(urllib.request.urlopen(url, timeout=5))
    except urllib.error.HTTPError as exc:  # a bad query is a 400 with Prometheus' reason
        return json.load(exc)


def wait_until_up(prometheus: str, jobs: set[str], timeout: float = 60.0) -> dict[str, str]:
    deadline, up = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        try:
            up = {r["metric"]["job"]: r["value"][1] for r in prom_query(prometheus, "up")["data"]["result"]}
        except OSError:
            pass
        if set(up) == jobs and set(up.values()) == {"1"}:
            break
        time.sleep(0.5)
    return up
