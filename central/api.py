"""The central HTTP API (FastAPI): fleet and model registries. Every write needs the bearer
token; every read (fleet, registry, rollouts, downloads, OpenAPI docs at ``/docs``) needs the read
token or the write token, as a bearer token or as the password of HTTP basic auth (what a browser
sends for ``/docs``). A package download also accepts a signed link
(:class:`central.tokens.DownloadLinks`), which is what the rollout commands send to the edge.
``/metrics`` is open unless told otherwise (central serve --metrics-port serves it apart).

    edgeline central serve --config site.yaml --token-file token --db sqlite:///central.db
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from central.alerts import AlertError, AlertStore, Filter
from central.console import add_console
from central.evidence import IMAGES, EvidenceArchive, EvidenceRefused, Image
from central.fleet import FleetStatus
from central.registry import MachineRow, Registry, RegistryError
from central.rollout_machine import GATE_HELP, Gates, Operation, RolloutError
from central.rollouts import RolloutManager
from central.tokens import DownloadLinks, MachineTokens
from stream.messages import IDENTIFIER_PATTERN, EvidenceUpload

MAX_PACKAGE_BYTES = 512 * 2**20
MAX_EVIDENCE_BODY_BYTES = 48 * 2**20
"""Three images of at most 8 MiB each, base64 in JSON, and the record."""


class RolloutIn(BaseModel):
    package: str = Field(description="package id to roll out, e.g. seg-synth-1.1.0-int8")
    model: str = Field(pattern=IDENTIFIER_PATTERN, description="model name in the site config it replaces")
    machines: list[Annotated[str, Field(pattern=IDENTIFIER_PATTERN)]] = Field(min_length=1)
    stages: list[Annotated[float, Field(ge=0, le=1)]] = Field(default_factory=lambda: [0.0, 0.25, 1.0],
                                                              description=GATE_HELP["stages"])
    soak_s: float = Field(60.0, ge=0, description=GATE_HELP["soak_s"])
    max_latency_ratio: float = Field(1.2, gt=1, description=GATE_HELP["max_latency_ratio"])
    max_error_rate: float = Field(0.01, ge=0, description=GATE_HELP["max_error_rate"])
    max_drift: float = Field(0.05, ge=0, description=GATE_HELP["max_drift"])
    drift_min_frames: int = Field(20, ge=1, description=GATE_HELP["drift_min_frames"])
    deploy_timeout_s: float = Field(120.0, gt=0, description=GATE_HELP["deploy_timeout_s"])
    min_shadow_agreement: float | None = Field(None, ge=0, le=1, description=GATE_HELP["min_shadow_agreement"])
    shadow_frames: int = Field(50, ge=1, description=GATE_HELP["shadow_frames"])
    shadow_timeout_s: float = Field(300.0, gt=0, description=GATE_HELP["shadow_timeout_s"])


class AcknowledgeIn(BaseModel):
    by: str = Field("operator", min_length=1, max_length=64, description="who acknowledges")
    note: str = Field("", max_length=2000)


class ShelveIn(BaseModel):
    by: str = Field("operator", min_length=1, max_length=64, description="who shelves")
    for_s: float = Field(gt=0, le=7 * 86_400, description="shelved for this long (at most a week)")
    note: str = Field("", max_length=2000, description="why (ISA-18.2 asks for a reason)")


class UnshelveIn(BaseModel):
    by: str = Field("operator", min_length=1, max_length=64)


class NoteIn(BaseModel):
    by: str = Field("operator", min_length=1, max_length=64)
    note: str = Field(min_length=1, max_length=2000)


class MachineIn(BaseModel):
    site: str = Field(pattern=IDENTIFIER_PATTERN)
    line: str = ""
    cameras: list[Annotated[str, Field(pattern=IDENTIFIER_PATTERN)]] = Field(default_factory=list)
    models: dict[str, str] = Field(default_factory=dict, description="model name -> package id")


def machine_out(row: MachineRow) -> dict[str, Any]:
    return {"id": row.id, "site": row.site, "line": row.line, "cameras": json.loads(row.cameras),
            "models": json.loads(row.models), "status": row.status, "last_heartbeat": row.last_heartbeat}


def presented_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization`` header: a bearer token, or the password of basic auth."""
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return None
    return None


def check_token(authorization: str | None, accepted: list[str], what: str) -> None:
    """401 without a token, 403 with one that is not among ``accepted``."""
    presented = presented_token(authorization)
    if not presented:
        raise HTTPException(401, f"{what}: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": 'Bearer, Basic realm="edgeline central"'})
    if not any(secrets.compare_digest(presented.encode(), good.encode()) for good in accepted):
        raise HTTPException(403, "the token is not valid")


def create_api(registry: Registry, token: str, rollouts: RolloutManager | None = None, *,
               read_token: str | None = None, links: DownloadLinks | None = None,
               open_metrics: bool = True, evidence: EvidenceArchive | None = None,
               alerts: AlertStore | None = None, fleet: FleetStatus | None = None) -> FastAPI:
    """The API: writes take ``token``; reads take it or ``read_token``; downloads also take a link
    signed by ``links`` (by default keyed on ``token``); ``/metrics`` needs a read token unless
    ``open_metrics``."""
    app = FastAPI(title="Edgeline central", version="1", description="Fleet and model registries of one site.",
                  docs_url=None, redoc_url=None, openapi_url=None)
    links = links or DownloadLinks(token)
    readers = [token] + ([read_token] if read_token else [])

    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        check_token(authorization, [token], "this call changes state")

    def require_read(authorization: Annotated[str | None, Header()] = None) -> None:
        check_token(authorization, readers, "reads need the read token (or the write token)")

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_read)])
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=[Depends(require_read)])
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="Edgeline central")

    @app.exception_handler(RegistryError)
    async def registry_error(request: Request, exc: RegistryError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.post("/models", status_code=201, dependencies=[Depends(require_token)],
              summary="Upload a signed model package (a .tar as the request body)")
    async def upload(request: Request) -> dict[str, Any]:
        body = await request.body()
        if not body:
            raise HTTPException(400, "send the package .tar as the request body (Content-Type: application/x-tar)")
        if len(body) > MAX_PACKAGE_BYTES:
            raise HTTPException(413, f"package larger than {MAX_PACKAGE_BYTES // 2**20} MiB")
        return asdict(await run_in_threadpool(registry.add_package, body))  # verifies and loads it in ONNX Runtime

    @app.get("/models", dependencies=[Depends(require_read)])
    def list_models() -> list[dict[str, Any]]:
        return [asdict(p) for p in registry.packages()]

    @app.get("/models/{package_id}", dependencies=[Depends(require_read)])
    def inspect_model(package_id: str) -> dict[str, Any]:
        return asdict(registry.package(package_id))

    @app.get("/models/{package_id}/download", response_class=FileResponse,
             summary="Download a package: with a read token, or by a signed link from a rollout command")
    def download(package_id: str, expires: int | None = None, signature: str | None = None,
                 authorization: Annotated[str | None, Header()] = None) -> FileResponse:
        if expires is None or signature is None:
            require_read(authorization)
        elif not links.valid(package_id, expires, signature, time.time()):
            raise HTTPException(403, "the download link has expired or is not valid")
        stored = registry.package(package_id)
        return FileResponse(registry.package_path(package_id), media_type="application/x-tar",
                            filename=f"{package_id}.tar", headers={"X-Checksum-Sha256": stored.sha256})

    @app.put("/machines/{machine_id}", dependencies=[Depends(require_token)])
    def put_machine(machine_id: Annotated[str, PathParam(pattern=IDENTIFIER_PATTERN)], machine: MachineIn) -> dict:
        for package_id in machine.models.values():
            registry.package(package_id)  # 404 for an unknown package
        return machine_out(registry.upsert_machine(machine_id, machine.site, machine.line, machine.cameras,
                                                   machine.models))

    @app.get("/machines", dependencies=[Depends(require_read)])
    def list_machines() -> list[dict[str, Any]]:
        return [machine_out(row) for row in registry.machines()]

    @app.get("/machines/{machine_id}", dependencies=[Depends(require_read)])
    def get_machine(machine_id: str) -> dict[str, Any]:
        return machine_out(registry.machine(machine_id))

    if rollouts is not None:
        _rollout_routes(app, rollouts, require_token, require_read)
    if evidence is not None:
        _evidence_routes(app, registry, evidence, token, require_read)
    if alerts is not None:
        _alert_routes(app, registry, alerts, evidence, require_token, require_read)
        add_console(app, registry, token, readers, alerts, evidence, rollouts, fleet)
    metrics_registry = central_metrics(registry, rollouts, evidence, alerts)

    @app.get("/metrics", response_class=PlainTextResponse,
             dependencies=[] if open_metrics else [Depends(require_read)])
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics_registry).decode(), media_type=CONTENT_TYPE_LATEST)

    return app


def central_metrics(registry: Registry, rollouts: RolloutManager | None, evidence: EvidenceArchive | None = None,
                    alerts: AlertStore | None = None) -> CollectorRegistry:
    """A Prometheus registry holding :class:`CentralCollector` (and the evidence and alarm figures)."""
    metrics_registry = CollectorRegistry()
    metrics_registry.register(CentralCollector(registry, rollouts))
    if evidence is not None:
        metrics_registry.register(EvidenceCollector(evidence))
    if alerts is not None:
        metrics_registry.register(AlarmCollector(alerts))
    return metrics_registry


class AlarmCollector(Collector):
    """Alarm KPIs at scrape time (:meth:`central.alerts.AlertStore.kpis`)."""

    def __init__(self, alerts: AlertStore) -> None:
        self.alerts = alerts

    def collect(self) -> Any:
        kpis = self.alerts.kpis()
        per_line = GaugeMetricFamily("edgeline_central_alarms_per_10_min", "Alarm episodes fired in the last 10 "
                                     "minutes, per line ('' for machines on no line)", labels=["line"])
        for line, count in sorted(kpis["per_line_per_10_min"].items()):
            per_line.add_metric([line], count)
        yield per_line
        yield GaugeMetricFamily("edgeline_central_site_alarms_per_10_min", "Alarm episodes fired in the last 10 "
                                "minutes on the site", value=kpis["site_per_10_min"])
        yield GaugeMetricFamily("edgeline_central_alarm_rate_reference_per_10_min", "EEMUA 191: at most one alarm "
                                "per 10 minutes per operator on average", value=kpis["eemua_per_10_min"])
        standing = GaugeMetricFamily("edgeline_central_alarms_standing", "Alarms neither acknowledged nor shelved, "
                                     "by severity", labels=["severity"])
        for severity in ("info", "warning", "critical"):
            standing.add_metric([severity], kpis["standing"].get(severity, 0))
        yield standing
        actors = GaugeMetricFamily("edgeline_central_bad_actor_episodes", "The 10 rule and key pairs with the most "
                                   "alarm episodes in the last 24 hours", labels=["rule", "key"])
        for actor in kpis["bad_actors"]:
            actors.add_metric([actor["rule"], actor["key"]], actor["episodes"])
        yield actors
        yield CounterMetricFamily("edgeline_central_alert_messages", "Alert messages recorded",
                                  value=self.alerts.recorded)
        rejected = CounterMetricFamily("edgeline_central_alert_messages_rejected", "Alert messages dropped, by "
                                       "reason (invalid, identity)", labels=["reason"])
        for reason in ("invalid", "identity"):
            rejected.add_metric([reason], self.alerts.rejected[reason])
        yield rejected


class EvidenceCollector(Collector):
    """What the evidence archive received, refused and removed, and what it holds."""

    def __init__(self, evidence: EvidenceArchive) -> None:
        self.evidence = evidence

    def collect(self) -> Any:
        evidence = self.evidence
        records, size = evidence.totals()
        yield GaugeMetricFamily("edgeline_central_evidence_records", "Evidence records kept", value=records)
        yield GaugeMetricFamily("edgeline_central_evidence_bytes", "Bytes of the evidence records kept", value=size)
        yield CounterMetricFamily("edgeline_central_evidence_received", "Evidence records received and kept",
                                  value=evidence.received)
        yield CounterMetricFamily("edgeline_central_evidence_duplicates", "Evidence records received again "
                                  "(a retried delivery) and kept once", value=evidence.duplicates)
        refused = CounterMetricFamily("edgeline_central_evidence_refused", "Evidence records refused, by reason "
                                      "(auth, identity, unknown_machine, schema, image, size)", labels=["reason"])
        for reason, count in sorted(evidence.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        evicted = CounterMetricFamily("edgeline_central_evidence_evicted", "Evidence records removed by retention, "
                                      "by reason (age, size)", labels=["reason"])
        for reason in ("age", "size"):
            evicted.add_metric([reason], evidence.evicted[reason])
        yield evicted


class CentralCollector(Collector):
    """Fleet, package and rollout state at scrape time."""

    def __init__(self, registry: Registry, rollouts: RolloutManager | None) -> None:
        self.registry, self.rollouts = registry, rollouts

    def collect(self) -> Any:
        packages = GaugeMetricFamily("edgeline_central_packages", "Model packages in the registry")
        packages.add_metric([], len(self.registry.packages()))
        yield packages
        rows = self.registry.machines()
        machines = GaugeMetricFamily("edgeline_central_machines", "Machines in the fleet registry")
        machines.add_metric([], len(rows))
        yield machines
        online = GaugeMetricFamily("edgeline_central_machine_online", "1 while a machine's retained status is "
                                   "online, 0 once its last-will says offline", labels=["machine"])
        last_beat = GaugeMetricFamily("edgeline_central_machine_last_heartbeat_timestamp_seconds",
                                      "Unix time of each machine's last heartbeat", labels=["machine"])
        for row in rows:
            online.add_metric([row.id], 1.0 if row.status == "online" else 0.0)
            if row.last_heartbeat:
                last_beat.add_metric([row.id], row.last_heartbeat)
        yield online
        yield last_beat
        phase = GaugeMetricFamily("edgeline_central_rollout_phase", "1 for each rollout's current phase",
                                  labels=["rollout", "package", "phase"])
        stage = GaugeMetricFamily("edgeline_central_rollout_stage", "Current stage of each rollout (1-based)",
                                  labels=["rollout", "package"])
        for rollout_id, rollout in (self.rollouts.rollouts.items() if self.rollouts else []):
            phase.add_metric([rollout_id, rollout.plan.package, rollout.phase], 1.0)
            stage.add_metric([rollout_id, rollout.plan.package], rollout.stage + 1)
        yield phase
        yield stage
        running = GaugeMetricFamily("edgeline_central_machines_on_package",
                                    "Machines whose last heartbeat reports a package, by package",
                                    labels=["model", "package"])
        counts: dict[tuple[str, str], int] = {}
        for models in (self.rollouts.running.values() if self.rollouts else []):
            for model, package in models.items():
                counts[(model, package)] = counts.get((model, package), 0) + 1
        for (model, package), count in sorted(counts.items()):
            running.add_metric([model, package], count)
        yield running
        agreement = GaugeMetricFamily("edgeline_central_shadow_agreement", "Mask agreement (IoU) of a candidate "
                                      "package in shadow mode with the running one, per machine",
                                      labels=["machine", "package"])
        frames = GaugeMetricFamily("edgeline_central_shadow_frames", "Frames compared in shadow mode so far",
                                   labels=["machine", "package"])
        for (machine, package), (value, count) in sorted(dict(self.rollouts.shadow if self.rollouts else {}).items()):
            agreement.add_metric([machine, package], value)
            frames.add_metric([machine, package], count)
        yield agreement
        yield frames
        restarts = CounterMetricFamily("edgeline_central_restarts", "Restarts of central's crashed loops "
                                       "(the rollout manager's tick), by service", labels=["service"])
        supervisor = self.rollouts.supervisor if self.rollouts else None
        for service, count in sorted((supervisor.restarts() if supervisor else {}).items()):
            restarts.add_metric([service], count)
        yield restarts
        rejected = CounterMetricFamily("edgeline_central_messages_rejected", "Messages from the machines that "
                                       "central dropped, by reason: identity (payload and topic disagree), invalid, "
                                       "unknown_machine", labels=["reason"])
        for reason, count in sorted((self.rollouts.rejected if self.rollouts else {}).items()):
            rejected.add_metric([reason], count)
        yield rejected


def _rollout_routes(app: FastAPI, rollouts: RolloutManager, require_token: Any, require_read: Any) -> None:
    def known(rollout_id: str) -> str:
        if rollout_id not in rollouts.rollouts:
            raise HTTPException(404, f"no rollout {rollout_id!r}")
        return rollout_id

    @app.post("/rollouts", status_code=201, dependencies=[Depends(require_token)])
    def create(body: RolloutIn) -> dict[str, Any]:
        gates = Gates(max_latency_ratio=body.max_latency_ratio, max_error_rate=body.max_error_rate,
                      max_drift=body.max_drift, drift_min_frames=body.drift_min_frames,
                      deploy_timeout_s=body.deploy_timeout_s,
                      min_shadow_agreement=body.min_shadow_agreement, shadow_frames=body.shadow_frames,
                      shadow_timeout_s=body.shadow_timeout_s)
        try:
            rollout_id = rollouts.create(body.package, body.model, body.machines, stages=tuple(body.stages),
                                         soak_s=body.soak_s, gates=gates)
        except RegistryError:
            raise  # an unknown package or machine: its own status (404)
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from None
        return rollouts.describe(rollout_id)

    @app.get("/rollouts", dependencies=[Depends(require_read)])
    def list_rollouts() -> list[dict[str, Any]]:
        """Every rollout (in the order they were created), without its history."""
        return [{k: v for k, v in rollouts.describe(rollout_id).items() if k != "history"}
                for rollout_id in list(rollouts.rollouts)]

    @app.get("/rollouts/{rollout_id}", dependencies=[Depends(require_read)])
    def describe(rollout_id: str) -> dict[str, Any]:
        """A rollout and its history; stages are counted from 1 (0: not started), times are UTC epoch seconds."""
        return rollouts.describe(known(rollout_id))

    @app.post("/rollouts/{rollout_id}/{operation}", dependencies=[Depends(require_token)],
              summary="Pause, resume or abort a rollout (abort rolls back)")
    def control(rollout_id: str, operation: Operation) -> dict[str, Any]:
        try:
            {Operation.pause: rollouts.pause, Operation.resume: rollouts.resume,
             Operation.abort: rollouts.abort}[operation](known(rollout_id))
        except RolloutError as exc:
            raise HTTPException(409, str(exc)) from None
        return rollouts.describe(rollout_id)


def _evidence_routes(app: FastAPI, registry: Registry, evidence: EvidenceArchive, token: str,
                     require_read: Any) -> None:
    machine_tokens = MachineTokens(token)

    def refuse(reason: str, status: int, detail: str) -> HTTPException:
        evidence.refused[reason] += 1
        return HTTPException(status, detail)

    def check_machine_token(authorization: str | None, machine: str) -> None:
        """The machine's own token (or the write token): a machine delivers only its own evidence."""
        try:
            check_token(authorization, [machine_tokens.token(machine), token], f"evidence delivery for {machine}")
        except HTTPException:
            evidence.refused["auth"] += 1
            raise

    @app.put("/evidence/{msg_id}", summary="Deliver an evidence record (the edge, with its machine token)")
    async def put_evidence(msg_id: str, request: Request,
                           authorization: Annotated[str | None, Header()] = None) -> JSONResponse:
        body = await request.body()
        if len(body) > MAX_EVIDENCE_BODY_BYTES:
            raise refuse("size", 413, f"an evidence record is limited to {MAX_EVIDENCE_BODY_BYTES // 2**20} MiB")
        try:
            upload = EvidenceUpload.model_validate_json(body)
        except ValueError as exc:
            raise refuse("schema", 422, f"not an evidence record: {exc}"[:2000]) from None
        check_machine_token(authorization, upload.evidence.machine)
        if upload.evidence.msg_id != msg_id:
            raise refuse("schema", 422, f"the record's msg_id {upload.evidence.msg_id!r} is not the URL's {msg_id!r}")
        try:
            machine = registry.machine(upload.evidence.machine)
        except RegistryError:
            raise refuse("unknown_machine", 404, f"no machine {upload.evidence.machine!r} in the fleet") from None
        if machine.site != upload.evidence.site:
            raise refuse("identity", 422, f"machine {machine.id} is on site {machine.site}, "
                                          f"not {upload.evidence.site}")
        try:
            stored = await run_in_threadpool(evidence.add, upload)
        except EvidenceRefused as exc:
            raise HTTPException(422, str(exc)) from None
        return JSONResponse(stored.record, status_code=201 if stored.created else 200)

    @app.get("/evidence", dependencies=[Depends(require_read)])
    def list_evidence(machine: str | None = None, camera: str | None = None, since: float | None = None,
                      until: float | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100
                      ) -> list[dict[str, Any]]:
        """Evidence records, newest first (capture time, UTC epoch seconds)."""
        return evidence.records(machine=machine, camera=camera, since=since, until=until, limit=limit)

    def known(msg_id: str) -> dict[str, Any]:
        record = evidence.record(msg_id)
        if record is None:
            raise HTTPException(404, f"no evidence {msg_id!r}")
        return record

    @app.get("/evidence/{msg_id}", dependencies=[Depends(require_read)])
    def get_evidence(msg_id: str) -> dict[str, Any]:
        return known(msg_id)

    @app.get("/evidence/{msg_id}/{image}", response_class=FileResponse, dependencies=[Depends(require_read)],
             summary="An image of an evidence record: frame, mask, overlay or thumbnail")
    def evidence_image(msg_id: str, image: Image) -> FileResponse:
        path = evidence.image_path(known(msg_id), image)
        if not path.is_file():  # removed by retention meanwhile
            raise HTTPException(404, f"evidence {msg_id!r} has no {image} any more")
        return FileResponse(path, media_type=IMAGES[image][1])


def _alert_routes(app: FastAPI, registry: Registry, alerts: AlertStore, evidence: EvidenceArchive | None,
                  require_token: Any, require_read: Any) -> None:
    @app.exception_handler(AlertError)
    async def alert_error(request: Request, exc: AlertError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    def linked_evidence(alert: dict[str, Any]) -> list[dict[str, Any]]:
        return evidence.linked(alert, registry.machines_on(alert["line"])) if evidence is not None else []

    @app.get("/alerts", dependencies=[Depends(require_read)])
    def list_alerts(state: Filter | None = None, severity: str | None = None, machine: str | None = None,
                    line: str | None = None, rule: str | None = None, since: float | None = None,
                    limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
        """Alert episodes, newest first; ``state``: firing, resolved, standing (neither acknowledged
        nor shelved) or shelved."""
        return alerts.alerts(state=state, severity=severity, machine=machine, line=line, rule=rule, since=since,
                             limit=limit)

    @app.get("/alerts/kpis", dependencies=[Depends(require_read)])
    def alarm_kpis() -> dict[str, Any]:
        """Alarms per 10 minutes (site, per line), standing alarms, the top 10 bad actors, EEMUA 191's figure."""
        return alerts.kpis()

    @app.get("/alerts/{alert_id}", dependencies=[Depends(require_read)])
    def get_alert(alert_id: str) -> dict[str, Any]:
        """One episode with its history and the evidence in its scope and time window."""
        alert = alerts.alert(alert_id)
        return alert | {"evidence": linked_evidence(alert)}

    @app.post("/alerts/{alert_id}/acknowledge", dependencies=[Depends(require_token)])
    def acknowledge(alert_id: str, body: AcknowledgeIn) -> dict[str, Any]:
        return alerts.acknowledge(alert_id, body.by, body.note)

    @app.post("/alerts/{alert_id}/shelve", dependencies=[Depends(require_token)])
    def shelve(alert_id: str, body: ShelveIn) -> dict[str, Any]:
        return alerts.shelve(alert_id, body.by, time.time() + body.for_s, body.note)

    @app.post("/alerts/{alert_id}/unshelve", dependencies=[Depends(require_token)])
    def unshelve(alert_id: str, body: UnshelveIn) -> dict[str, Any]:
        return alerts.unshelve(alert_id, body.by)

    @app.post("/alerts/{alert_id}/note", dependencies=[Depends(require_token)])
    def note(alert_id: str, body: NoteIn) -> dict[str, Any]:
        """A note in the alert's history, its state unchanged."""
        return alerts.note(alert_id, body.by, body.note)
