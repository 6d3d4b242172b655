"""Grafana dashboards as code (grafana-foundation-sdk, pinned in the central extra).

Each panel is one PromQL query over the metrics the edge agents, the bridge, the Faust workers
and central expose. ``write_dashboards`` renders them to JSON for Grafana's file provisioning
(``deploy/grafana/dashboards``); ``provision`` pushes the Prometheus datasource and the
dashboards to a running Grafana with grafana-client.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef

DATASOURCE_UID = "edgeline-prometheus"
DATASOURCE = DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)


@dataclass(frozen=True)
class PanelSpec:
    title: str
    expr: str
    legend: str = ""
    unit: str = "short"
    kind: str = "timeseries"
    description: str = ""


@dataclass(frozen=True)
class DashboardSpec:
    uid: str
    title: str
    panels: tuple[PanelSpec, ...]


DASHBOARDS = (
    DashboardSpec("edgeline-fleet", "Edgeline: fleet overview", (
        PanelSpec("Machines connected", "sum(edgeline_edge_mqtt_connected)", kind="stat",
                  description="Edge agents whose MQTT connection is up"),
        PanelSpec("Cameras delivering frames", "sum(edgeline_edge_camera_up)", kind="stat"),
        PanelSpec("Frames inferred per second", "sum by (machine) (rate(edgeline_edge_frames_inferred_total[1m]))",
                  "{{machine}}", "fps"),
        PanelSpec("Frames dropped per second", "sum by (machine) (rate(edgeline_edge_frames_dropped_total[1m]))",
                  "{{machine}}", "fps", description="Camera queues full: inference did not keep up"),
        PanelSpec("Outbox backlog", "sum by (machine) (edgeline_edge_outbox_messages)", "{{machine}}",
                  description="Messages waiting for the broker (grows during an outage)"),
        PanelSpec("Bridge and worker throughput",
                  "sum(rate(edgeline_bridge_kafka_produced_total[1m])) or sum(rate(edgeline_worker_messages_total[1m]))",
                  "records/s", "short"),
    )),
    DashboardSpec("edgeline-cameras", "Edgeline: cameras per machine", (
        PanelSpec("Inferred fps per camera", "rate(edgeline_edge_frames_inferred_total[1m])", "{{machine}}/{{camera}}",
                  "fps"),
        PanelSpec("Dropped fps per camera", "rate(edgeline_edge_frames_dropped_total[1m])", "{{machine}}/{{camera}}",
                  "fps"),
        PanelSpec("Gated (unchanged scene) fps", "rate(edgeline_edge_frames_gated_total[1m])",
                  "{{machine}}/{{camera}}", "fps"),
        PanelSpec("Inference latency p95",
                  "histogram_quantile(0.95, sum by (machine, model, le) "
                  "(rate(edgeline_edge_inference_latency_seconds_bucket[5m])))", "{{machine}} {{model}}", "s"),
        PanelSpec("Cameras shed by the overload policy", "edgeline_edge_camera_shed", "{{machine}}/{{camera}}"),
    )),
    DashboardSpec("edgeline-quality", "Edgeline: defects and anomalies", (
        PanelSpec("Defect frames per minute", "60 * sum by (machine) (rate(edgeline_edge_defect_frames_total[5m]))",
                  "{{machine}}", description="Frames on which a model's image-level alarm fired"),
        PanelSpec("Anomalous sensor samples per minute",
                  "60 * sum by (machine, group) (rate(edgeline_edge_anomalies_total[5m]))", "{{machine}}/{{group}}"),
        PanelSpec("Capture to decision latency p99",
                  "histogram_quantile(0.99, sum by (le) (rate(edgeline_worker_event_latency_seconds_bucket[5m])))",
                  "p99", "s"),
    )),
    DashboardSpec("edgeline-alerts", "Edgeline: alerts and dead letters", (
        PanelSpec("Alerts raised per minute", '60 * sum(rate(edgeline_worker_emitted_total{kind="alert"}[5m]))',
                  "alerts"),
        PanelSpec("Commands sent to machines per minute",
                  "60 * sum(rate(edgeline_bridge_commands_forwarded_total[5m]))", "commands"),
        PanelSpec("Dead-lettered messages per minute",
                  "60 * (sum(rate(edgeline_bridge_dead_lettered_total[5m])) "
                  "+ sum(rate(edgeline_worker_dead_lettered_total[5m])))", "dead letters"),
        PanelSpec("Outbox drops (full outbox)", "sum by (machine, priority) (increase(edgeline_edge_outbox_dropped_total[1h]))",
                  "{{machine}} {{priority}}"),
    )),
    DashboardSpec("edgeline-rollouts", "Edgeline: model rollouts", (
        PanelSpec("Machines per package", "edgeline_central_machines_on_package", "{{model}} {{package}}"),
        PanelSpec("Rollout phase", "edgeline_central_rollout_phase == 1", "{{package}} {{phase}}"),
        PanelSpec("Rollout stage", "edgeline_central_rollout_stage", "{{package}}"),
        PanelSpec("Packages in the registry", "edgeline_central_packages", kind="stat"),
    )),
)


def _panel(spec: PanelSpec) -> object:
    query = prometheus.Dataquery().expr(spec.expr).legend_format(spec.legend or "__auto").ref_id("A")
    builder = (stat.Panel() if spec.kind == "stat" else timeseries.Panel())
    builder = (builder.title(spec.title).description(spec.description).unit(spec.unit).datasource(DATASOURCE)
               .with_target(query).height(8).span(12))
    return builder


def build(spec: DashboardSpec) -> dict:
    builder = (db.Dashboard(spec.title).uid(spec.uid).tags(["edgeline"]).refresh("10s").time("now-1h", "now")
               .timezone("browser"))
    for panel in spec.panels:
        builder = builder.with_panel(_panel(panel))
    return json.loads(JSONEncoder(sort_keys=True).encode(builder.build()))


def write_dashboards(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for spec in DASHBOARDS:
        path = folder / f"{spec.uid}.json"
        path.write_text(json.dumps(build(spec), indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


METRIC_NAME = re.compile(r"\b(edgeline_[a-z0-9_]+)")


def metric_names(expr: str) -> set[str]:
    """The metric names a query reads, with histogram/counter suffixes as scraped."""
    return set(METRIC_NAME.findall(expr))


def provision(url: str, token: str, prometheus_url: str) -> list[str]:
    """Create or update the Prometheus datasource and every dashboard on a running Grafana."""
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaClientError

    api = GrafanaApi.from_url(url, credential=token)
    datasource = {"name": "Edgeline Prometheus", "uid": DATASOURCE_UID, "type": "prometheus", "access": "proxy",
                  "url": prometheus_url, "isDefault": True}
    try:
        api.datasource.get_datasource_by_uid(DATASOURCE_UID)
        api.datasource.update_datasource_by_uid(DATASOURCE_UID, datasource)
    except GrafanaClientError:
        api.datasource.create_datasource(datasource)
    uids = []
    for spec in DASHBOARDS:
        api.dashboard.update_dashboard({"dashboard": build(spec), "overwrite": True,
                                        "message": "provisioned by edgeline grafana provision"})
        uids.append(spec.uid)
    return uids
