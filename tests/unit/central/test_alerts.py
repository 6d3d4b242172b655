"""Central's alert store through the API (TestClient over the real app, on SQLite and on a real
PostgreSQL server): episodes from firing to resolved, deduped on msg_id; acknowledge and shelve
with the write token only; the evidence in an alert's scope and window; the alarm KPIs; and the
MQTT listener's refusals."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from paho.mqtt.client import MQTTMessage

from central.alerts import AlertListener, AlertStore
from central.api import create_api
from central.evidence import EvidenceArchive
from central.registry import Registry
from edge.evidence import Candidate, render
from models.package.signing import builtin_trusted_keys
from stream.messages import Alert, Evidence, Heartbeat, stable_msg_id

TOKEN = "s3cret-token-of-the-plant"
WRITE = {"Authorization": f"Bearer {TOKEN}"}
READ = {"Authorization": "Bearer read-only-token-of-the-plant"}


@pytest.fixture(params=["sqlite", "postgresql"])
def central(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    url = (f"sqlite:///{tmp_path / 'central.db'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres").new_database())
    registry = Registry(url, tmp_path / "storage", builtin_trusted_keys())
    for machine, line in (("m1", "L1"), ("m2", "L1"), ("m3", "L2")):
        registry.upsert_machine(machine, "s1", line, ["c0", "c1"], {})
    archive = EvidenceArchive(registry.engine, tmp_path / "evidence", max_bytes=10**9, max_age_s=86_400)
    store = AlertStore(registry.engine, registry.line_of)
    app = create_api(registry, TOKEN, read_token=READ["Authorization"][7:], evidence=archive, alerts=store)
    with TestClient(app) as client:
        yield client, store, archive
    registry.engine.dispose()


def alert(state: str, ts: float, *, rule: str = "surface-defect", machine: str = "m1", camera: str | None = "c0",
          scope: str = "camera", severity: str = "warning") -> Alert:
    key = f"{machine}/{camera}" if scope == "camera" else machine
    return Alert(msg_id=stable_msg_id(rule, key, state, ts), site="s1", machine=machine, ts=ts, rule=rule,
                 state=state, severity=severity, scope=scope, key=key, value=3.0, text=f"{rule} {state}",
                 camera=camera if scope == "camera" else None)


def test_an_episode_runs_from_firing_to_resolved_and_a_redelivered_alert_changes_nothing(central: Any) -> None:
    client, store, _ = central
    now = time.time()
    fired = store.record(alert("firing", now - 60))
    assert store.record(alert("firing", now - 60)) is None and store.duplicates == 1
    assert store.record(alert("resolved", now - 30)) == fired
    episode = client.get(f"/alerts/{fired}", headers=READ).json()
    assert (episode["state"], episode["fired_at"], episode["resolved_at"]) == ("resolved", now - 60, now - 30)
    assert [e["kind"] for e in episode["history"]] == ["firing", "resolved"]
    assert episode["line"] == "L1"  # from the fleet registry
    again = store.record(alert("firing", now - 10))
    assert again != fired
    assert [a["id"] for a in client.get("/alerts", params={"state": "firing"}, headers=READ).json()] == [again]
    assert client.get("/alerts/nope", headers=READ).status_code == 404


def test_acknowledge_and_shelve_need_the_write_token_and_change_the_state(central: Any) -> None:
    client, store, _ = central
    fired = store.record(alert("firing", time.time() - 5))
    assert client.post(f"/alerts/{fired}/acknowledge", json={}, headers=READ).status_code == 403
    assert [a["id"] for a in client.get("/alerts", params={"state": "standing"}, headers=READ).json()] == [fired]
    acked = client.post(f"/alerts/{fired}/acknowledge", json={"by": "anna", "note": "seen"}, headers=WRITE)
    assert acked.status_code == 200 and acked.json()["acknowledged_by"] == "anna"
    assert client.post(f"/alerts/{fired}/acknowledge", json={"by": "ben"}, headers=WRITE).status_code == 409
    assert client.get("/alerts", params={"state": "standing"}, headers=READ).json() == []
    other = store.record(alert("firing", time.time() - 4, camera="c1"))
    shelved = client.post(f"/alerts/{other}/shelve", json={"by": "anna", "for_s": 3600, "note": "lens cleaning"},
                          headers=WRITE).json()
    assert shelved["shelved_until"] > time.time() + 3500 and not shelved["standing"]
    assert [a["id"] for a in client.get("/alerts", params={"state": "shelved"}, headers=READ).json()] == [other]
    assert client.post(f"/alerts/{other}/unshelve", json={"by": "anna"}, headers=WRITE).json()["standing"]
    assert client.post(f"/alerts/{other}/unshelve", json={}, headers=WRITE).status_code == 409
    noted = client.post(f"/alerts/{other}/note", json={"by": "ben", "note": "lens wiped at 10:40"}, headers=WRITE)
    assert noted.status_code == 200 and noted.json()["standing"]  # a note changes no state
    history = client.get(f"/alerts/{other}", headers=READ).json()["history"]
    assert [(e["kind"], e["by"]) for e in history] == [("firing", ""), ("shelved", "anna"), ("unshelved", "anna"),
                                                      ("note", "ben")]
    assert history[1]["note"] == "lens cleaning" and history[3]["note"] == "lens wiped at 10:40"


def record_evidence(archive: EvidenceArchive, machine: str, camera: str, ts: float) -> str:
    image, mask = np.full((60, 80, 3), 80, np.uint8), np.zeros((60, 80), np.uint8)
    mask[10:20, 10:20] = 1
    evidence = Evidence(msg_id=f"ev-{machine}-{camera}-{int(ts * 1000)}", site="s1", machine=machine, ts=ts,
                        camera=camera, seq=1, model="seg", version="1", reason="alarm", defect_ratio=0.02,
                        width=80, height=60)
    return archive.add(render(Candidate(evidence, image, mask), 80)).record["id"]


def test_an_alert_links_the_evidence_in_its_scope_and_window(central: Any) -> None:
    client, store, archive = central
    now = time.time()
    inside = record_evidence(archive, "m1", "c0", now - 50)
    record_evidence(archive, "m1", "c1", now - 50)  # another camera
    record_evidence(archive, "m1", "c0", now - 200)  # long before it fired
    record_evidence(archive, "m1", "c0", now - 5)  # after it resolved
    fired = store.record(alert("firing", now - 60))
    store.record(alert("resolved", now - 30))
    assert [e["id"] for e in client.get(f"/alerts/{fired}", headers=READ).json()["evidence"]] == [inside]
    on_line = record_evidence(archive, "m2", "c1", now - 50)  # m2 shares line L1 with m1
    record_evidence(archive, "m3", "c0", now - 50)  # line L2
    line_alert = store.record(alert("firing", now - 60, rule="line-burst", scope="line", camera=None))
    linked = {e["id"] for e in client.get(f"/alerts/{line_alert}", headers=READ).json()["evidence"]}
    assert {inside, on_line} <= linked and all(e.startswith(("ev-m1", "ev-m2")) for e in linked)


def test_the_kpis_count_recent_alarms_per_line_standing_ones_and_the_bad_actors(central: Any) -> None:
    client, store, _ = central
    now = time.time()
    for i in range(3):
        store.record(alert("firing", now - 100 - i, camera="c0"))
        store.record(alert("resolved", now - 90 - i, camera="c0"))
    store.record(alert("firing", now - 50, machine="m3", severity="critical"))
    store.record(alert("firing", now - 3000, machine="m2"))  # older than 10 minutes
    acked = store.alerts(machine="m2")[0]["id"]
    store.acknowledge(acked, "anna")
    kpis = client.get("/alerts/kpis", headers=READ).json()
    assert kpis["per_line_per_10_min"] == {"L1": 3, "L2": 1} and kpis["site_per_10_min"] == 4
    assert kpis["standing"] == {"warning": 3, "critical": 1}
    assert kpis["bad_actors"][0] == {"rule": "surface-defect", "key": "m1/c0", "episodes": 3}
    metrics = client.get("/metrics").text
    assert 'edgeline_central_alarms_per_10_min{line="L1"} 3.0' in metrics
    assert 'edgeline_central_alarms_standing{severity="critical"} 1.0' in metrics
    assert "edgeline_central_alarm_rate_reference_per_10_min 1.0" in metrics


def mqtt_message(topic: str, payload: bytes) -> MQTTMessage:
    message = MQTTMessage(topic=topic.encode())
    message.payload = payload
    return message


def test_the_listener_records_alerts_and_drops_what_is_not_one_or_names_another_machine(central: Any) -> None:
    _, store, _ = central
    listener = AlertListener(store, "s1")
    good = alert("firing", time.time())
    listener.on_message(mqtt_message("edgeline/v1/s1/m1/alert", good.to_json()))
    listener.on_message(mqtt_message("edgeline/v1/s1/m2/alert", alert("firing", time.time() - 1).to_json()))
    listener.on_message(mqtt_message("edgeline/v1/s1/m1/alert", b"{not json"))
    beat = Heartbeat(site="s1", machine="m1", ts=time.time(), uptime_s=1.0)
    listener.on_message(mqtt_message("edgeline/v1/s1/m1/alert", beat.to_json()))
    assert [a["id"] for a in store.alerts()] == [good.msg_id]
    assert store.rejected == {"identity": 2, "invalid": 1}
