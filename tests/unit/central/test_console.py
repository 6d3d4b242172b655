"""The operator console's pages through the real app (TestClient, SQLite): sign-in by token into a
cookie, the read token looks but cannot act, the pages show the fleet, alerts with their KPIs and
evidence, a camera's defect-ratio plot from heartbeats, and the rollouts. The browser test
(tests/integration/test_console_browser.py) drives the same pages in Chromium."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from central.alerts import AlertStore
from central.api import create_api
from central.console import COOKIE, sparkline
from central.evidence import EvidenceArchive
from central.fleet import FleetStatus, Sample
from central.registry import Registry
from edge.evidence import Candidate, render
from models.package.signing import builtin_trusted_keys
from stream.messages import Alert, CameraStatus, Evidence, Heartbeat

TOKEN, READ_TOKEN = "write-token-of-the-plant", "read-token-of-the-plant"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
def console(tmp_path: Path) -> Any:
    registry = Registry(f"sqlite:///{tmp_path / 'c.db'}", tmp_path / "storage", builtin_trusted_keys())
    registry.upsert_machine("m1", "s1", "L1", ["c0"], {})
    archive = EvidenceArchive(registry.engine, tmp_path / "evidence", max_bytes=10**9, max_age_s=86_400)
    store, fleet = AlertStore(registry.engine, registry.line_of), FleetStatus()
    app = create_api(registry, TOKEN, read_token=READ_TOKEN, evidence=archive, alerts=store, fleet=fleet)
    with TestClient(app) as client:
        yield client, store, archive, fleet
    registry.engine.dispose()


def sign_in(client: TestClient, token: str) -> None:
    response = client.post("/console/login", content=f"token={token}&next=/console/alerts", headers=FORM,
                           follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/console/alerts"


def firing(ts: float) -> Alert:
    return Alert(msg_id=f"alert-{int(ts * 1000)}", site="s1", machine="m1", ts=ts, rule="surface-defect",
                 state="firing", severity="critical", scope="camera", key="m1/c0", value=3.0, camera="c0")


def test_pages_need_a_token_and_a_wrong_one_is_turned_away(console: Any) -> None:
    client = console[0]
    assert client.get("/console/alerts", follow_redirects=False).headers["location"] == "/console/login?next=/console/alerts"
    wrong = client.post("/console/login", content="token=nope&next=/console", headers=FORM, follow_redirects=False)
    assert "failed=true" in wrong.headers["location"] and COOKIE not in wrong.cookies
    assert client.get("/console/fleet/table", headers={"HX-Request": "true"}).headers["HX-Redirect"] == "/console/login"
    assert client.get("/console/alerts", headers={"Authorization": f"Bearer {READ_TOKEN}"}).status_code == 200


def test_the_read_token_looks_but_cannot_acknowledge(console: Any) -> None:
    client, store, _, _ = console
    alert_id = store.record(firing(time.time()))
    sign_in(client, READ_TOKEN)
    page = client.get("/console/alerts").text
    assert "surface-defect" in page and "Acknowledge" not in page and "(read only)" in page
    assert client.post(f"/console/alerts/{alert_id}/acknowledge", content="by=eve", headers=FORM).status_code == 403
    assert store.alert(alert_id)["acknowledged_at"] is None


def test_the_alerts_page_shows_kpis_and_evidence_and_acknowledges(console: Any) -> None:
    client, store, archive, _ = console
    now = time.time()
    alert_id = store.record(firing(now - 5))
    image, mask = np.full((60, 80, 3), 90, np.uint8), np.zeros((60, 80), np.uint8)
    mask[20:30, 20:40] = 1
    record = Evidence(msg_id="evidence-1", site="s1", machine="m1", ts=now - 4, camera="c0", seq=7, model="seg",
                      version="1", reason="alarm", defect_ratio=0.04, width=80, height=60)
    archive.add(render(Candidate(record, image, mask), 80))
    sign_in(client, TOKEN)
    listing = client.get("/console/alerts/list").text
    assert '<b id="kpi-site">1</b>' in listing and '<b id="kpi-standing">1</b>' in listing
    assert 'src="/console/evidence/evidence-1/thumbnail"' in listing
    assert client.get("/console/evidence/evidence-1/overlay").headers["content-type"] == "image/jpeg"
    page = client.get(f"/console/alerts/{alert_id}").text
    assert 'id="overlay"' in page and 'src="/console/evidence/evidence-1/overlay"' in page
    changed = client.post(f"/console/alerts/{alert_id}/acknowledge", content="by=anna", headers=FORM)
    assert "acknowledged by anna" in changed.text
    again = client.post(f"/console/alerts/{alert_id}/acknowledge", content="by=ben", headers=FORM)
    assert "was acknowledged by anna" in again.text  # the 409 of the store, shown in the fragment
    assert '<b id="kpi-standing">0</b>' in client.get("/console/alerts/list").text


def test_the_fleet_and_camera_pages_read_the_heartbeats(console: Any) -> None:
    client, _, _, fleet = console
    now = time.time()
    for i, ratio in enumerate((0.0, 0.02, 0.05)):
        fleet.on_heartbeat(Heartbeat(site="s1", machine="m1", ts=now - 20 + 10 * i, uptime_s=10.0, cameras=[
            CameraStatus(camera="c0", state="ok", fps=10.0, inferred_fps=9.5, frames_inferred=100 * (i + 1),
                         defect_frames=6 * i, defect_ratio=ratio)]))
    sign_in(client, TOKEN)
    fleet_table = client.get("/console/fleet/table").text
    assert 'href="/console/cameras/m1/c0"' in fleet_table and "10.0 / 9.5" in fleet_table
    camera = client.get("/console/cameras/m1/c0").text
    assert '<b id="alarm-rate">36.0</b>' in camera  # 12 alarmed frames in 20 s
    assert "<polyline" in camera


def test_the_sparkline_spans_the_hour_and_scales_to_the_highest_ratio() -> None:
    now = 10_000.0
    samples = [Sample(now - 7200, 0.9, 0, 0), Sample(now - 3600, 0.1, 0, 0), Sample(now, 0.2, 0, 0)]
    assert sparkline(samples, now, size=(100, 50)) == "0.0,25.0 100.0,0.0"  # the older sample is left out
