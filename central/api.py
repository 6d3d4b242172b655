"""The central HTTP API (FastAPI): fleet and model registries. Every write needs the bearer token;
reads are open on the plant network. OpenAPI docs at ``/docs``.

    edgeline central serve --config site.yaml --token-file token --db sqlite:///central.db
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel, Field

from central.registry import MachineRow, Registry, RegistryError
from central.rollout import GATE_HELP, Gates, Operation, RolloutError
from central.rollouts import RolloutManager
from stream.messages import IDENTIFIER_PATTERN

MAX_PACKAGE_BYTES = 512 * 2**20


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


class MachineIn(BaseModel):
    site: str = Field(pattern=IDENTIFIER_PATTERN)
    line: str = ""
    cameras: list[Annotated[str, Field(pattern=IDENTIFIER_PATTERN)]] = Field(default_factory=list)
    models: dict[str, str] = Field(default_factory=dict, description="model name -> package id")


def machine_out(row: MachineRow) -> dict[str, Any]:
    return {"id": row.id, "site": row.site, "line": row.line, "cameras": json.loads(row.cameras),
            "models": json.loads(row.models), "status": row.status, "last_heartbeat": row.last_heartbeat}


def create_api(registry: Registry, token: str, rollouts: RolloutManager | None = None) -> FastAPI:
    app = FastAPI(title="Edgeline central", version="1", description="Fleet and model registries of one site.")

    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        if authorization is None or not authorization.startswith("Bearer "):
            raise HTTPException(401, "this call changes state: send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(authorization.removeprefix("Bearer ").strip(), token):
            raise HTTPException(403, "the bearer token is not valid")

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
        return asdict(registry.add_package(body))

    @app.get("/models")
    def list_models() -> list[dict[str, Any]]:
        return [asdict(p) for p in registry.packages()]

    @app.get("/models/{package_id}")
    def inspect_model(package_id: str) -> dict[str, Any]:
        return asdict(registry.package(package_id))

    @app.get("/models/{package_id}/download", response_class=FileResponse)
    def download(package_id: str) -> FileResponse:
        stored = registry.package(package_id)
        return FileResponse(registry.package_path(package_id), media_type="application/x-tar",
                            filename=f"{package_id}.tar", headers={"X-Checksum-Sha256": stored.sha256})

    @app.put("/machines/{machine_id}", dependencies=[Depends(require_token)])
    def put_machine(machine_id: Annotated[str, PathParam(pattern=IDENTIFIER_PATTERN)], machine: MachineIn) -> dict:
        for package_id in machine.models.values():
            registry.package(package_id)  # 404 for an unknown package
        return machine_out(registry.upsert_machine(machine_id, machine.site, machine.line, machine.cameras,
                                                   machine.models))

    @app.get("/machines")
    def list_machines() -> list[dict[str, Any]]:
        return [machine_out(row) for row in registry.machines()]

    @app.get("/machines/{machine_id}")
    def get_machine(machine_id: str) -> dict[str, Any]:
        return machine_out(registry.machine(machine_id))

    if rollouts is not None:
        _rollout_routes(app, rollouts, require_token)
    metrics_registry = CollectorRegistry()
    metrics_registry.register(CentralCollector(registry, rollouts))

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics_registry).decode(), media_type=CONTENT_TYPE_LATEST)

    return app


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
        rejected = CounterMetricFamily("edgeline_central_messages_rejected", "Messages from the machines that "
                                       "central dropped, by reason: identity (payload and topic disagree), invalid, "
                                       "unknown_machine", labels=["reason"])
        for reason, count in sorted((self.rollouts.rejected if self.rollouts else {}).items()):
            rejected.add_metric([reason], count)
        yield rejected


def _rollout_routes(app: FastAPI, rollouts: RolloutManager, require_token: Any) -> None:
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

    @app.get("/rollouts")
    def list_rollouts() -> list[dict[str, Any]]:
        """Every rollout (in the order they were created), without its history."""
        return [{k: v for k, v in rollouts.describe(rollout_id).items() if k != "history"}
                for rollout_id in list(rollouts.rollouts)]

    @app.get("/rollouts/{rollout_id}")
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
