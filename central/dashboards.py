"""Grafana dashboards as code (grafana-foundation-sdk, pinned in the central extra).

Each panel is one PromQL query over the metrics the edge agents, the bridge, the Kafka workers
and central expose. Every dashboard links to the operator console (``$console``, a text variable:
the console's base URL as the browser reaches it), and the alert and camera panels link to its
alert and camera pages. ``write_dashboards`` renders them to JSON for Grafana's file provisioning
(``deploy/grafana/dashboards``); ``provision`` pushes the Prometheus datasource and the
dashboards to a running Grafana with grafana-client.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import (DashboardLinkType, DataSourceRef, VariableOption, VariableRefresh,
                                                     VariableSort)

DATASOURCE_UID = "edgeline-prometheus"
DATASOURCE = DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)
CONSOLE_DEFAULT = "http://localhost:8080"
CAMERA_PAGE = "${console}/console/cameras/${__field.labels.machine}/${__field.labels.camera}"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class PanelSpec:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"
    description: str = ""
    link: tuple[str, str] | None = None
    """A panel link (title, URL), e.g. to a console page."""
    data_link: tuple[str, str] | None = None
    """A link on each series (title, URL with ``${__field.labels.<label>}``), e.g. to its camera's page."""


@dataclass(frozen=True)
class DashboardSpec:
    uid: str
    title: str
    panels: tuple[PanelSpec, ...]
    machine_variable: bool = False
    """A ``$machine`` drop-down (machines that report frames); queries filter on ``machine=~"$machine"``."""


def panel(title: str, expr: str, legend: str = "", unit: str = "short", kind: str = "timeseries",
          description: str = "", link: tuple[str, str] | None = None,
          data_link: tuple[str, str] | None = None) -> PanelSpec:
    """A panel of one query."""
    return PanelSpec(title, (Query(expr, legend),), unit, kind, description, link, data_link)


M = 'machine=~"$machine"'
DASHBOARDS = (
    DashboardSpec("edgeline-fleet", "Edgeline: fleet overview", (
        panel("Machines online", "sum(edgeline_central_machine_online)", kind="stat",
              description="Machines whose retained MQTT status is online (their last-will turns it offline)"),
        panel("Machines connected (agents' view)", "sum(edgeline_edge_mqtt_connected)", kind="stat",
              description="Edge agents that Prometheus reaches and whose MQTT connection is up"),
        panel("Cameras delivering frames", "sum(edgeline_edge_camera_up)", kind="stat"),
        panel("Seconds since each machine's last heartbeat",
              "time() - edgeline_central_machine_last_heartbeat_timestamp_seconds", "{{machine}}", "s",
              description="Grows for a machine that went silent"),
        panel("Frames inferred per second", "sum by (machine) (rate(edgeline_edge_frames_inferred_total[1m]))",
              "{{machine}}", "fps"),
        panel("Frames dropped per second", "sum by (machine) (rate(edgeline_edge_frames_dropped_total[1m]))",
              "{{machine}}", "fps", description="Camera queues full: inference did not keep up"),
        panel("Outbox backlog", "sum by (machine) (edgeline_edge_outbox_messages)", "{{machine}}",
              description="Messages waiting for the broker (grows during an outage)"),
        PanelSpec("Stream throughput", (
            Query("sum(rate(edgeline_bridge_kafka_produced_total[1m]))", "bridge: MQTT to Kafka"),
            Query("sum(rate(edgeline_worker_messages_total[1m]))", "workers: consumed"),
            Query("sum(rate(edgeline_rules_messages_total[1m]))", "embedded rules: evaluated"),
        ), "reqps"),
    )),
    DashboardSpec("edgeline-cameras", "Edgeline: cameras per machine", (
        panel("Inferred fps per camera", f"rate(edgeline_edge_frames_inferred_total{{{M}}}[1m])",
              "{{machine}}/{{camera}}", "fps"),
        panel("Dropped fps per camera", f"rate(edgeline_edge_frames_dropped_total{{{M}}}[1m])",
              "{{machine}}/{{camera}}", "fps"),
        panel("Gated (unchanged scene) fps", f"rate(edgeline_edge_frames_gated_total{{{M}}}[1m])",
              "{{machine}}/{{camera}}", "fps"),
        PanelSpec("Inference latency", tuple(
            Query(f"histogram_quantile({q}, sum by (machine, model, le) "
                  f"(rate(edgeline_edge_inference_latency_seconds_bucket{{{M}}}[5m])))",
                  f"p{round(q * 100)} {{{{machine}}}} {{{{model}}}}") for q in (0.5, 0.95)), "s"),
        panel("Cameras shed by the overload policy", f"edgeline_edge_camera_shed{{{M}}}", "{{machine}}/{{camera}}",
              description="1 while the overload policy infers only one frame in N for the camera"),
        panel("Camera up", f"edgeline_edge_camera_up{{{M}}}", "{{machine}}/{{camera}}",
              description="0 while a camera reconnects or has failed"),
        panel("Inference errors per second",
              f"sum by (machine, model) (rate(edgeline_edge_inference_errors_total{{{M}}}[5m]))",
              "{{machine}} {{model}}", description="Frames whose inference raised; 3 failing batches in a row after "
              "a swap roll the package back on the machine"),
    ), machine_variable=True),
    DashboardSpec("edgeline-quality", "Edgeline: defects and anomalies", (
        panel("Defect frames per minute", "60 * sum by (machine) (rate(edgeline_edge_defect_frames_total[5m]))",
              "{{machine}}", description="Frames on which a model's image-level alarm fired"),
        panel("Defect frames per minute per camera", "60 * rate(edgeline_edge_defect_frames_total[5m])",
              "{{machine}}/{{camera}}", description="Click a series for its camera's page in the operator console "
              "(latest evidence, alarm rate)", data_link=("Camera in the console", CAMERA_PAGE)),
        panel("Anomalous sensor samples per minute",
              "60 * sum by (machine, group) (rate(edgeline_edge_anomalies_total[5m]))", "{{machine}}/{{group}}"),
        PanelSpec("Capture to decision latency p99", (
            Query("histogram_quantile(0.99, sum by (le) (rate(edgeline_worker_event_latency_seconds_bucket[5m])))",
                  "workers (Kafka)"),
            Query("histogram_quantile(0.99, sum by (le) (rate(edgeline_rules_latency_seconds_bucket[5m])))",
                  "embedded rules"),
        ), "s"),
    )),
    DashboardSpec("edgeline-alerts", "Edgeline: alerts and dead letters", (
        PanelSpec("Alerts raised per minute", (
            Query('60 * sum(rate(edgeline_worker_emitted_total{kind="alert"}[5m]))', "workers (Kafka)"),
            Query('60 * sum(rate(edgeline_rules_emitted_total{kind="alert"}[5m]))', "embedded rules"),
        ), link=("Alerts in the console", "${console}/console/alerts")),
        PanelSpec("Alarms per 10 minutes per line", (
            Query("edgeline_central_alarms_per_10_min", "{{line}}"),
            Query("edgeline_central_alarm_rate_reference_per_10_min", "EEMUA 191: 1 per operator"),
        ), description="Alarm episodes fired in the last 10 minutes, against EEMUA 191's acceptable average of "
           "one per 10 minutes per operator", link=("Alerts in the console", "${console}/console/alerts")),
        panel("Standing alarms", "sum by (severity) (edgeline_central_alarms_standing)", "{{severity}}",
              description="Neither acknowledged nor shelved", link=("Alerts in the console",
                                                                   "${console}/console/alerts")),
        panel("Bad actors (episodes in 24 h)", "edgeline_central_bad_actor_episodes", "{{rule}} {{key}}",
              description="The 10 rule and key pairs with the most alarm episodes"),
        PanelSpec("Commands sent to machines per minute", (
            Query("60 * sum(rate(edgeline_bridge_commands_forwarded_total[5m]))", "bridge: Kafka to MQTT"),
            Query('60 * sum(rate(edgeline_rules_emitted_total{kind="command"}[5m]))', "embedded rules"),
        )),
        PanelSpec("Dead-lettered messages per minute", (
            Query("60 * sum(rate(edgeline_bridge_dead_lettered_total[5m]))", "bridge"),
            Query("60 * sum(rate(edgeline_worker_dead_lettered_total[5m]))", "workers"),
            Query("60 * sum(rate(edgeline_rules_dead_lettered_total[5m]))", "embedded rules"),
        )),
        panel("Outbox drops (full outbox)",
              "sum by (machine, priority) (increase(edgeline_edge_outbox_dropped_total[1h]))",
              "{{machine}} {{priority}}"),
    )),
    DashboardSpec("edgeline-rollouts", "Edgeline: model rollouts", (
        panel("Machines per package", "edgeline_central_machines_on_package", "{{model}} {{package}}"),
        panel("Rollout phase", "edgeline_central_rollout_phase == 1", "{{package}} {{phase}}"),
        panel("Rollout stage", "edgeline_central_rollout_stage", "{{package}}"),
        panel("Shadow agreement", "edgeline_central_shadow_agreement", "{{machine}} {{package}}", "percentunit",
              description="Mask IoU of a candidate in shadow mode with the running version (gate: "
                          "min_shadow_agreement)"),
        panel("Packages in the registry", "edgeline_central_packages", kind="stat"),
    )),
)


def _panel(spec: PanelSpec) -> object:
    builder = (stat.Panel() if spec.kind == "stat" else timeseries.Panel())
    builder = (builder.title(spec.title).description(spec.description).unit(spec.unit).datasource(DATASOURCE)
               .height(8).span(12))
    for ref, query in zip("ABCDEFGH", spec.queries, strict=False):
        builder = builder.with_target(prometheus.Dataquery().expr(query.expr).legend_format(query.legend or "__auto")
                                      .ref_id(ref))
    if spec.link is not None:
        builder = builder.links([_link(*spec.link)])
    if spec.data_link is not None:
        builder = builder.data_links([_link(*spec.data_link)])
    return builder


def _link(title: str, url: str) -> db.DashboardLink:
    return db.DashboardLink(title).type(DashboardLinkType.LINK).url(url).target_blank(True)


def _console_variable() -> object:
    """``$console``: the console's base URL as the browser reaches it (edit it on the dashboard)."""
    return (db.TextBoxVariable("console").label("Console URL").default_value(CONSOLE_DEFAULT)
            .current(VariableOption(selected=True, text=CONSOLE_DEFAULT, value=CONSOLE_DEFAULT)))


def _machine_variable() -> object:
    return (db.QueryVariable("machine").label("Machine").datasource(DATASOURCE)
            .query("label_values(edgeline_edge_frames_inferred_total, machine)")
            .refresh(VariableRefresh.ON_DASHBOARD_LOAD).sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True).all_value(".*")
            .current(VariableOption(selected=True, text=["All"], value=["$__all"])))


def build(spec: DashboardSpec) -> dict:
    builder = (db.Dashboard(spec.title).uid(spec.uid).tags(["edgeline"]).refresh("10s").time("now-1h", "now")
               .timezone("browser").with_variable(_console_variable())
               .link(_link("Operator console", "${console}/console")))
    if spec.machine_variable:
        builder = builder.with_variable(_machine_variable())
    for panel_spec in spec.panels:
        builder = builder.with_panel(_panel(panel_spec))
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

    api = GrafanaApi.from_url(url, credential=token)
    try:
        _provision_datasource(api, prometheus_url)
        for spec in DASHBOARDS:
            api.dashboard.update_dashboard({"dashboard": build(spec), "overwrite": True,
                                            "message": "provisioned by edgeline grafana provision"})
    finally:
        api.client.s.close()  # its HTTP session runs an idle-connection thread until closed
    return [spec.uid for spec in DASHBOARDS]


def _provision_datasource(api: Any, prometheus_url: str) -> None:
    from grafana_client.client import GrafanaClientError

    datasource = {"name": "Edgeline Prometheus", "uid": DATASOURCE_UID, "type": "prometheus", "access": "proxy",
                  "url": prometheus_url, "isDefault": True}
    try:
        api.datasource.get_datasource_by_uid(DATASOURCE_UID)
        api.datasource.update_datasource_by_uid(DATASOURCE_UID, datasource)
    except GrafanaClientError:
        api.datasource.create_datasource(datasource)
