"""The evidence central keeps: what the edge agents send of their alarmed frames (:mod:`edge.evidence`).

Each record is a row of table ``evidence`` (the registry's database) and a folder
``<root>/<machine>/<msg_id>/`` holding ``frame.jpg``, ``mask.png``, ``overlay.jpg`` and
``thumbnail.jpg`` (the overlay, ``THUMBNAIL_WIDTH`` pixels wide, made here). A record is checked
before it is kept: its images must decode, at the size the record states. A record received again
(a retried delivery) is answered as stored and kept once.

Retention: records older than ``max_age_s`` go, and the oldest go while all of them take more than
``max_bytes``; each removal is counted by reason (``age``, ``size``). The size bound is applied on
every new record, the age bound by the ``retention`` loop (every ``RETENTION_CHECK_S``) as well.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from sqlalchemy import Engine, Float, Integer, String, Text, delete, func, select
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from central.registry import Base
from stream.messages import EvidenceUpload
from stream.service import Service, Supervisor

THUMBNAIL_WIDTH = 320
RETENTION_CHECK_S = 60.0
LINK_BEFORE_S = 30.0
"""An alert links the evidence captured from this long before it fired until it resolved."""
IMAGES = {"frame": ("frame.jpg", "image/jpeg"), "mask": ("mask.png", "image/png"),
          "overlay": ("overlay.jpg", "image/jpeg"), "thumbnail": ("thumbnail.jpg", "image/jpeg")}
Image = Literal["frame", "mask", "overlay", "thumbnail"]


class EvidenceRow(Base):
    __tablename__ = "evidence"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    """The record's msg_id, given by the edge."""
    site: Mapped[str] = mapped_column(String(64))
    machine: Mapped[str] = mapped_column(String(64), index=True)
    camera: Mapped[str] = mapped_column(String(64))
    ts: Mapped[float] = mapped_column(Float, index=True)
    seq: Mapped[int] = mapped_column(Integer)
    result_msg_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(16))
    defect_ratio: Mapped[float] = mapped_column(Float)
    regions: Mapped[str] = mapped_column(Text)
    """JSON list of the defect regions (class, area, bbox, score)."""
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(Integer)
    received: Mapped[float] = mapped_column(Float)


class EvidenceRefused(ValueError):
    """A record central does not keep (HTTP 422)."""


@dataclass(frozen=True)
class Stored:
    record: dict[str, Any]
    created: bool
    """False for a record that was already kept (a retried delivery)."""


class EvidenceArchive(Service):
    """Evidence records in SQL and on disk, bounded by age and total size (see the module docstring)."""

    def __init__(self, engine: Engine, root: Path, *, max_bytes: int, max_age_s: float,
                 supervisor: Supervisor | None = None) -> None:
        super().__init__("evidence-archive", supervisor=supervisor)
        Base.metadata.create_all(engine, tables=[EvidenceRow.__table__])
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.received = 0
        self.duplicates = 0
        self.refused: Counter[str] = Counter()
        self.evicted: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.add_loop("retention", self._retention_loop)

    def add(self, upload: EvidenceUpload, now: float | None = None) -> Stored:
        """Keep a record (idempotent on its msg_id); :class:`EvidenceRefused` for images that do
        not decode at the stated size."""
        evidence = upload.evidence
        with self._lock, self.sessions() as session:
            existing = session.get(EvidenceRow, evidence.msg_id)
            if existing is not None:
                self.duplicates += 1
                return Stored(record_dict(existing), created=False)
            try:
                thumbnail = _checked_thumbnail(upload)
            except EvidenceRefused:
                self.refused["image"] += 1
                raise
            size = self._write_files(upload, thumbnail)
            row = EvidenceRow(id=evidence.msg_id, site=evidence.site, machine=evidence.machine,
                              camera=evidence.camera, ts=evidence.ts, seq=evidence.seq,
                              result_msg_id=evidence.result_msg_id, model=evidence.model, version=evidence.version,
                              reason=evidence.reason, defect_ratio=evidence.defect_ratio,
                              regions=json.dumps([r.model_dump() for r in evidence.regions]), width=evidence.width,
                              height=evidence.height, bytes=size, received=time.time() if now is None else now)
            session.add(row)
            session.commit()
            self.received += 1
        self.enforce(time.time() if now is None else now)
        return Stored(record_dict(row), created=True)

    def records(self, *, machine: str | None = None, camera: str | None = None, since: float | None = None,
                until: float | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first, filtered by machine, camera and capture time."""
        query = select(EvidenceRow).order_by(EvidenceRow.ts.desc()).limit(limit)
        for column, value in ((EvidenceRow.machine, machine), (EvidenceRow.camera, camera)):
            if value is not None:
                query = query.where(column == value)
        if since is not None:
            query = query.where(EvidenceRow.ts >= since)
        if until is not None:
            query = query.where(EvidenceRow.ts <= until)
        with self.sessions() as session:
            return [record_dict(row) for row in session.scalars(query)]

    def linked(self, alert: dict[str, Any], line_machines: list[str], limit: int = 50) -> list[dict[str, Any]]:
        """The records in an alert's scope (its camera; its machine; for a line rule every machine
        of ``line_machines``) from ``LINK_BEFORE_S`` before it fired until it resolved (or now),
        newest first."""
        machines = line_machines if alert["scope"] == "line" else [alert["machine"]]
        camera = alert["camera"] if alert["scope"] == "camera" else None
        until = alert["resolved_at"] if alert["resolved_at"] is not None else time.time()
        records = [record for machine in machines for record in self.records(
            machine=machine, camera=camera, since=alert["fired_at"] - LINK_BEFORE_S, until=until, limit=limit)]
        return sorted(records, key=lambda record: record["ts"], reverse=True)[:limit]

    def record(self, msg_id: str) -> dict[str, Any] | None:
        with self.sessions() as session:
            row = session.get(EvidenceRow, msg_id)
        return record_dict(row) if row is not None else None

    def image_path(self, record: dict[str, Any], image: Image) -> Path:
        return self.root / record["machine"] / record["id"] / IMAGES[image][0]

    def totals(self) -> tuple[int, int]:
        """Records kept and their bytes on disk."""
        with self.sessions() as session:
            count, size = session.execute(select(func.count(), func.coalesce(func.sum(EvidenceRow.bytes), 0))).one()
        return int(count), int(size)

    def enforce(self, now: float) -> None:
        """Remove what is older than ``max_age_s``, then the oldest while over ``max_bytes``."""
        with self._lock, self.sessions() as session:
            old = list(session.scalars(select(EvidenceRow).where(EvidenceRow.ts < now - self.max_age_s)))
            self._remove(session, old, "age")
            total = session.scalar(select(func.coalesce(func.sum(EvidenceRow.bytes), 0))) or 0
            while total > self.max_bytes:
                oldest = list(session.scalars(select(EvidenceRow).order_by(EvidenceRow.ts).limit(50)))
                if not oldest:
                    break
                going = []
                for row in oldest:
                    if total <= self.max_bytes:
                        break
                    going.append(row)
                    total -= row.bytes
                self._remove(session, going, "size")
            session.commit()

    def _remove(self, session: Any, rows: list[EvidenceRow], reason: str) -> None:
        if not rows:
            return
        for row in rows:
            shutil.rmtree(self.root / row.machine / row.id, ignore_errors=True)
        session.execute(delete(EvidenceRow).where(EvidenceRow.id.in_([row.id for row in rows])))
        self.evicted[reason] += len(rows)

    def _write_files(self, upload: EvidenceUpload, thumbnail: bytes) -> int:
        """The record's images, written beside and renamed into place; their bytes."""
        folder = self.root / upload.evidence.machine / upload.evidence.msg_id
        staging = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        contents = {"frame": upload.frame_jpeg, "mask": upload.mask_png, "overlay": upload.overlay_jpeg,
                    "thumbnail": thumbnail}
        for image, data in contents.items():
            (staging / IMAGES[image][0]).write_bytes(data)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
        return sum(len(data) for data in contents.values())

    def _retention_loop(self) -> None:
        while not self.stopping.wait(RETENTION_CHECK_S):
            self.enforce(time.time())


def _checked_thumbnail(upload: EvidenceUpload) -> bytes:
    """The overlay's thumbnail, once every image decodes at the record's size."""
    size = (upload.evidence.height, upload.evidence.width)
    images = {}
    for name, data, flags in (("frame_jpeg", upload.frame_jpeg, cv2.IMREAD_COLOR),
                              ("mask_png", upload.mask_png, cv2.IMREAD_UNCHANGED),
                              ("overlay_jpeg", upload.overlay_jpeg, cv2.IMREAD_COLOR)):
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        if image is None:
            raise EvidenceRefused(f"{name} is not an image")
        if image.shape[:2] != size:
            raise EvidenceRefused(f"{name} is {image.shape[1]}x{image.shape[0]}, the record says {size[1]}x{size[0]}")
        images[name] = image
    overlay = images["overlay_jpeg"]
    width = min(THUMBNAIL_WIDTH, overlay.shape[1])
    height = max(1, round(overlay.shape[0] * width / overlay.shape[1]))
    ok, data = cv2.imencode(".jpg", cv2.resize(overlay, (width, height), interpolation=cv2.INTER_AREA),
                            [cv2.IMWRITE_JPEG_QUALITY, 80])
    if not ok:
        raise EvidenceRefused("the overlay could not be made into a thumbnail")
    return data.tobytes()


def record_dict(row: EvidenceRow) -> dict[str, Any]:
    return {"id": row.id, "site": row.site, "machine": row.machine, "camera": row.camera, "ts": row.ts,
            "seq": row.seq, "result_msg_id": row.result_msg_id, "model": row.model, "version": row.version,
            "reason": row.reason, "defect_ratio": row.defect_ratio, "regions": json.loads(row.regions),
            "width": row.width, "height": row.height, "bytes": row.bytes, "received": row.received,
            "images": {image: f"/evidence/{row.id}/{image}" for image in IMAGES}}
