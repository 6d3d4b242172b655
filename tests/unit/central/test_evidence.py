"""Central's evidence archive through the API (FastAPI's TestClient over the real app, on SQLite and
on a real PostgreSQL server): a machine delivers only its own evidence with its token, a retried
delivery is kept once, images are checked and served, and retention by age and size is counted."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from central.api import create_api
from central.evidence import EvidenceArchive
from central.registry import Registry
from central.tokens import MachineTokens
from edge.evidence import Candidate, render
from models.package.signing import builtin_trusted_keys
from stream.messages import Evidence, EvidenceUpload

TOKEN = "s3cret-token-of-the-plant"
READ = {"Authorization": "Bearer read-only-token-of-the-plant"}
MACHINE_TOKENS = MachineTokens(TOKEN)


def machine_auth(machine: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {MACHINE_TOKENS.token(machine)}"}


@pytest.fixture(params=["sqlite", "postgresql"])
def central(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    url = (f"sqlite:///{tmp_path / 'central.db'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres").new_database())
    registry = Registry(url, tmp_path / "storage", builtin_trusted_keys())
    for machine in ("m1", "m2"):
        registry.upsert_machine(machine, "s1", "L1", ["c0"], {})
    archive = EvidenceArchive(registry.engine, tmp_path / "evidence", max_bytes=10**9, max_age_s=86_400)
    with TestClient(create_api(registry, TOKEN, read_token=READ["Authorization"][7:], evidence=archive)) as client:
        yield client, archive
    registry.engine.dispose()


def upload(ts: float | None = None, machine: str = "m1", size: tuple[int, int] = (90, 120)) -> EvidenceUpload:
    """A record captured at ``ts`` (default: now, within the archive's age bound)."""
    ts = round(time.time(), 3) if ts is None else ts
    h, w = size
    image = np.full((h, w, 3), 70, np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[30:60, 40:80] = 1
    evidence = Evidence(msg_id=f"ev-{machine}-{int(ts * 1000)}", site="s1", machine=machine, ts=ts, camera="c0", seq=int(ts),
                        model="seg", version="1", reason="alarm", defect_ratio=float(mask.mean()), width=w, height=h)
    return render(Candidate(evidence, image, mask), jpeg_quality=85)


def put(client: TestClient, record: EvidenceUpload, headers: dict[str, str]) -> Any:
    return client.put(f"/evidence/{record.evidence.msg_id}", content=record.model_dump_json(by_alias=True),
                      headers=headers | {"Content-Type": "application/json"})


def test_a_delivered_record_is_kept_once_listed_and_its_images_served(central: Any) -> None:
    client, archive = central
    record = upload()
    created = put(client, record, machine_auth("m1"))
    assert created.status_code == 201, created.text
    assert put(client, record, machine_auth("m1")).status_code == 200  # a retried delivery
    assert (archive.received, archive.duplicates) == (1, 1)
    listed = client.get("/evidence", params={"machine": "m1"}, headers=READ).json()
    assert [r["id"] for r in listed] == [record.evidence.msg_id]
    assert listed[0]["regions"] == [] and listed[0]["reason"] == "alarm"
    overlay = client.get(f"/evidence/{record.evidence.msg_id}/overlay", headers=READ)
    assert overlay.headers["content-type"] == "image/jpeg" and overlay.content == record.overlay_jpeg
    thumbnail = cv2.imdecode(np.frombuffer(client.get(f"/evidence/{record.evidence.msg_id}/thumbnail",
                                                      headers=READ).content, np.uint8), cv2.IMREAD_COLOR)
    assert thumbnail.shape == (90, 120, 3)  # never enlarged
    assert client.get(f"/evidence/{record.evidence.msg_id}/mask", headers=READ).content == record.mask_png
    assert client.get("/evidence/nope", headers=READ).status_code == 404
    assert client.get(f"/evidence/{record.evidence.msg_id}/overlay").status_code == 401  # reads need a token
    metrics = client.get("/metrics").text
    assert "edgeline_central_evidence_records 1.0" in metrics and "edgeline_central_evidence_duplicates_total 1.0" in metrics


def test_a_machine_delivers_only_its_own_evidence(central: Any) -> None:
    client, archive = central
    assert put(client, upload(machine="m1"), {}).status_code == 401
    assert put(client, upload(machine="m1"), machine_auth("m2")).status_code == 403  # m2's token, m1's record
    assert put(client, upload(machine="m1"), READ).status_code == 403  # the read token writes nothing
    assert put(client, upload(machine="m9"), machine_auth("m9")).status_code == 404  # not in the fleet
    assert archive.refused == {"auth": 3, "unknown_machine": 1}
    assert put(client, upload(machine="m1"), {"Authorization": f"Bearer {TOKEN}"}).status_code == 201


def test_records_whose_images_do_not_match_are_refused(central: Any) -> None:
    client, archive = central
    record = upload()
    wrong_size = record.model_copy(update={"evidence": record.evidence.model_copy(update={"width": 121})})
    refused = put(client, wrong_size, machine_auth("m1"))
    assert refused.status_code == 422 and "the record says 121x90" in refused.json()["detail"]
    not_an_image = record.model_copy(update={"frame_jpeg": b"not a jpeg"})
    assert put(client, not_an_image, machine_auth("m1")).status_code == 422
    other_id = client.put("/evidence/another-id", content=record.model_dump_json(by_alias=True),
                          headers=machine_auth("m1"))
    assert other_id.status_code == 422 and archive.refused == {"image": 2, "schema": 1}
    assert client.get("/evidence", headers=READ).json() == []


def test_retention_removes_the_oldest_past_the_size_bound_and_the_old_past_the_age(central: Any,
                                                                                   tmp_path: Path) -> None:
    client, archive = central
    now = round(time.time(), 3)
    first = archive.add(upload(now - 30), now=now)
    archive.max_bytes = first.record["bytes"] * 2 + first.record["bytes"] // 2  # room for two
    for ts in (now - 20, now - 10):
        archive.add(upload(ts), now=now)
    assert [r["ts"] for r in archive.records()] == [now - 10, now - 20]
    assert archive.evicted == {"size": 1}
    assert not (tmp_path / "evidence" / "m1" / first.record["id"]).exists()  # its files went with it
    archive.max_age_s = 15.0
    archive.enforce(now)
    assert [r["ts"] for r in archive.records()] == [now - 10] and archive.evicted == {"size": 1, "age": 1}
    assert archive.totals() == (1, first.record["bytes"])
