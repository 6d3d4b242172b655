"""The operator console: server-rendered pages (Jinja2) with htmx for the live parts and the
actions, served by central under ``/console``. Nothing to build: htmx 2.0.11 (0BSD) is kept in
``central/static``, the pages' CSS is in their base template.

Why this and not a single-page app: every page is a read of central's own state, the live parts are
fragments re-rendered on a timer (``hx-trigger="every 3s"``), and an action (acknowledge, shelve,
pause a rollout) posts a form and swaps the fragment it changed; a plant's browser needs nothing
but HTML, and a test needs nothing but a browser.

Sign-in: ``/console/login`` takes a token (the read token to look, the write token to also act) and
keeps it in an HttpOnly, ``SameSite=Strict`` cookie scoped to ``/console``; every console request
is checked as the API checks its ``Authorization`` header (which is also accepted). An action with
the read token is refused (403), as in the API.

Pages: the fleet (machines, online state, cameras with fps, running package per model, last
heartbeat), the alerts (KPIs against EEMUA 191's one alarm per 10 minutes, and the live list with
each alert's latest evidence thumbnail and its buttons), one alert (its overlay large, regions,
rule and value, history, the camera's defect ratio over the last hour), one camera (its latest
evidence, alarm rate), the rollouts (stages, gates and the values last checked against them,
history, pause/resume/abort).
"""

from __future__ import annotations

import secrets
import time
import urllib.parse
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from central.alerts import AlertError, AlertStore
from central.evidence import IMAGES, EvidenceArchive, Image
from central.fleet import FleetStatus, Sample
from central.registry import Registry
from central.rollout_machine import Operation, RolloutError
from central.rollouts import RolloutManager

COOKIE = "edgeline_console"
HERE = Path(__file__).resolve().parent
TEMPLATES = Jinja2Templates(directory=HERE / "templates")
PLOT_SIZE = (480, 120)


class NeedsLogin(Exception):
    """A console request without a valid token: pages go to the sign-in page."""


def sparkline(samples: list[Sample], now: float, span_s: float = 3600.0,
              size: tuple[int, int] = PLOT_SIZE) -> str:
    """SVG polyline points of the defect ratio over the last ``span_s`` (x: time, y: 0..max)."""
    width, height = size
    shown = [s for s in samples if s.ts >= now - span_s]
    top = max((s.defect_ratio for s in shown), default=0.0) or 1.0
    return " ".join(f"{width * (1 - (now - s.ts) / span_s):.1f},{height * (1 - s.defect_ratio / top):.1f}"
                    for s in shown)


def add_console(app: FastAPI, registry: Registry, token: str, readers: list[str], alerts: AlertStore,
                evidence: EvidenceArchive | None, rollouts: RolloutManager | None, fleet: FleetStatus | None) -> None:
    """Mount the console's pages, fragments and static files on ``app``."""
    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console-static")

    @app.exception_handler(NeedsLogin)
    async def to_login(request: Request, exc: NeedsLogin) -> Response:
        if request.headers.get("HX-Request"):
            return Response(status_code=401, headers={"HX-Redirect": "/console/login"})
        return RedirectResponse(f"/console/login?next={urllib.parse.quote(request.url.path)}", status_code=303)

    def presented(request: Request) -> str:
        value = request.cookies.get(COOKIE) or ""
        scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
        return value or (bearer.strip() if scheme.lower() == "bearer" else "")

    def reader(request: Request) -> bool:
        """Checks the request's token; True when it may also act (the write token)."""
        value = presented(request)
        if not any(secrets.compare_digest(value.encode(), good.encode()) for good in readers if value):
            raise NeedsLogin()
        return secrets.compare_digest(value.encode(), token.encode())

    def writer(request: Request) -> None:
        if not reader(request):
            raise HTTPException(403, "acting needs the write token: sign in with it")

    def page(request: Request, name: str, **context: Any) -> HTMLResponse:
        return TEMPLATES.TemplateResponse(request, name, {"can_write": reader(request), "now": time.time(),
                                                          **context})

    async def form(request: Request) -> dict[str, str]:
        parsed = urllib.parse.parse_qs((await request.body()).decode("utf-8", errors="replace"))
        return {key: values[-1] for key, values in parsed.items()}

    @app.get("/console/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page(request: Request, next: str = "/console", failed: bool = False) -> HTMLResponse:
        return TEMPLATES.TemplateResponse(request, "login.html", {"next": next, "failed": failed})

    @app.post("/console/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        fields = await form(request)
        value, target = fields.get("token", "").strip(), fields.get("next", "/console")
        target = target if target.startswith("/console") else "/console"
        if not any(value and secrets.compare_digest(value.encode(), good.encode()) for good in readers):
            return RedirectResponse(f"/console/login?failed=true&next={urllib.parse.quote(target)}", status_code=303)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, value, httponly=True, samesite="strict", path="/console")
        return response

    @app.post("/console/logout", include_in_schema=False)
    def logout() -> Response:
        response = RedirectResponse("/console/login", status_code=303)
        response.delete_cookie(COOKIE, path="/console")
        return response

    # ------------------------------------------------------------ fleet

    def fleet_rows() -> list[dict[str, Any]]:
        rows = []
        for machine in registry.machines():
            beat = fleet.latest(machine.id) if fleet is not None else None
            rows.append({"machine": machine, "beat": beat,
                         "running": rollouts.running.get(machine.id, {}) if rollouts is not None else {}})
        return rows

    @app.get("/console", response_class=HTMLResponse, include_in_schema=False)
    def fleet_page(request: Request) -> HTMLResponse:
        return page(request, "fleet.html", rows=fleet_rows())

    @app.get("/console/fleet/table", response_class=HTMLResponse, include_in_schema=False)
    def fleet_table(request: Request) -> HTMLResponse:
        return page(request, "fleet_table.html", rows=fleet_rows())

    # ------------------------------------------------------------ alerts

    def with_thumbnail(alert: dict[str, Any]) -> dict[str, Any]:
        linked = linked_evidence(alert, limit=1)
        return alert | {"thumbnail": linked[0]["id"] if linked else None}

    def linked_evidence(alert: dict[str, Any], limit: int = 12) -> list[dict[str, Any]]:
        if evidence is None:
            return []
        return evidence.linked(alert, registry.machines_on(alert["line"]), limit)

    @app.get("/console/alerts", response_class=HTMLResponse, include_in_schema=False)
    def alerts_page(request: Request) -> HTMLResponse:
        return page(request, "alerts.html", alerts=[with_thumbnail(a) for a in alerts.alerts(limit=50)],
                    kpis=alerts.kpis())

    @app.get("/console/alerts/list", response_class=HTMLResponse, include_in_schema=False)
    def alerts_list(request: Request) -> HTMLResponse:
        return page(request, "alerts_list.html", alerts=[with_thumbnail(a) for a in alerts.alerts(limit=50)],
                    kpis=alerts.kpis())

    @app.get("/console/alerts/{alert_id}", response_class=HTMLResponse, include_in_schema=False)
    def alert_page(request: Request, alert_id: str) -> HTMLResponse:
        alert = alerts.alert(alert_id)
        records = linked_evidence(alert)
        samples = fleet.series(alert["machine"], alert["camera"]) if fleet is not None and alert["camera"] else []
        now = time.time()
        return page(request, "alert.html", alert=alert, evidence=records, plot=sparkline(samples, now),
                    plot_size=PLOT_SIZE, samples=len(samples))

    @app.post("/console/alerts/{alert_id}/{action}", response_class=HTMLResponse, include_in_schema=False)
    async def alert_action(request: Request, alert_id: str, action: str) -> HTMLResponse:
        writer(request)
        fields = await form(request)
        by = fields.get("by", "").strip() or "operator"
        try:
            if action == "acknowledge":
                alerts.acknowledge(alert_id, by, fields.get("note", ""))
            elif action == "shelve":
                alerts.shelve(alert_id, by, time.time() + float(fields.get("hours", "1")) * 3600,
                              fields.get("note", ""))
            elif action == "unshelve":
                alerts.unshelve(alert_id, by)
            else:
                raise HTTPException(404, f"no action {action!r}")
        except (AlertError, ValueError) as exc:
            return page(request, "alert_state.html", alert=alerts.alert(alert_id), error=str(exc))
        return page(request, "alert_state.html", alert=alerts.alert(alert_id), error=None)

    # ------------------------------------------------------------ cameras and evidence images

    @app.get("/console/cameras/{machine}/{camera}", response_class=HTMLResponse, include_in_schema=False)
    def camera_page(request: Request, machine: str, camera: str) -> HTMLResponse:
        records = evidence.records(machine=machine, camera=camera, limit=12) if evidence is not None else []
        samples = fleet.series(machine, camera) if fleet is not None else []
        rate = fleet.alarms_per_minute(machine, camera) if fleet is not None else None
        return page(request, "camera.html", machine=machine, camera=camera, evidence=records,
                    alarms_per_minute=rate, plot=sparkline(samples, time.time()), plot_size=PLOT_SIZE,
                    alerts=alerts.alerts(machine=machine, limit=10))

    @app.get("/console/evidence/{msg_id}/{image}", include_in_schema=False)
    def evidence_image(request: Request, msg_id: str, image: Image) -> FileResponse:
        reader(request)
        record = evidence.record(msg_id) if evidence is not None else None
        if record is None or not (path := evidence.image_path(record, image)).is_file():
            raise HTTPException(404, f"no {image} of evidence {msg_id!r}")
        return FileResponse(path, media_type=IMAGES[image][1])

    # ------------------------------------------------------------ rollouts

    def rollout_views() -> list[dict[str, Any]]:
        if rollouts is None:
            return []
        return [rollouts.describe(rollout_id) | {"values": rollouts.gate_values(rollout_id)}
                for rollout_id in reversed(list(rollouts.rollouts))]

    @app.get("/console/rollouts", response_class=HTMLResponse, include_in_schema=False)
    def rollouts_page(request: Request) -> HTMLResponse:
        return page(request, "rollouts.html", rollouts=rollout_views())

    @app.get("/console/rollouts/list", response_class=HTMLResponse, include_in_schema=False)
    def rollouts_list(request: Request) -> HTMLResponse:
        return page(request, "rollouts_list.html", rollouts=rollout_views())

    @app.post("/console/rollouts/{rollout_id}/{operation}", response_class=HTMLResponse, include_in_schema=False)
    def rollout_action(request: Request, rollout_id: str, operation: Operation) -> HTMLResponse:
        writer(request)
        if rollouts is None or rollout_id not in rollouts.rollouts:
            raise HTTPException(404, f"no rollout {rollout_id!r}")
        error = None
        try:
            {Operation.pause: rollouts.pause, Operation.resume: rollouts.resume,
             Operation.abort: rollouts.abort}[operation](rollout_id)
        except RolloutError as exc:
            error = str(exc)
        return page(request, "rollouts_list.html", rollouts=rollout_views(), error=error)
