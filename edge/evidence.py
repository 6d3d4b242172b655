"""Evidence of what the models saw: the frame, its mask and an overlay, kept and sent to central.

When a model's image-level alarm fires on a frame (and on a ``snapshot`` command) the vision
pipeline hands the frame and its class mask to :class:`EvidenceService` (``evidence:<machine>``):

- **Rate** (:class:`EvidenceRate`), per camera: the first frame of each alarm run, then at most one
  every ``evidence.min_interval_s`` while the alarm lasts, never two within ``min_gap_s`` (an alarm
  that flickers on and off); a snapshot always.
- **Off the inference loop**: the pipeline only puts a record on a bounded queue (full: the record
  is dropped and counted); the ``write`` loop encodes the frame (JPEG), the mask (PNG) and the
  overlay (the mask's contours drawn on the frame, JPEG) and stores them.
- **Stored locally first** (:class:`EvidenceStore`): one folder per record, written under ``tmp/``
  and renamed into ``pending/`` (a killed agent leaves no half record), moved to ``delivered/``
  once central has it. The store is bounded by ``evidence.max_bytes``: the oldest delivered (or
  refused) records go first, then the oldest undelivered, each eviction counted.
- **Delivered with retry** (the ``deliver`` loop): ``PUT <central>/evidence/<msg_id>`` with the
  machine's evidence token, oldest first; a record leaves ``pending/`` only when central answered
  2xx (a retried PUT of the same id is idempotent there). Unreachable, 5xx, 408 or 429: wait and
  retry the same record, backing off up to ``retry_max_s``. Any other answer (a bad token, a
  record central refuses) moves it to ``refused/``, logged and counted, so one bad record cannot
  hold back the rest. Evidence never goes through the MQTT outbox: results are never starved.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import shutil
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import httpx
import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.settings import EvidenceConfig, evidence_path
from stream.messages import Evidence, EvidenceUpload
from stream.service import Service, Supervisor
from stream.settings import ConfigError

log = logging.getLogger(__name__)

EVIDENCE_TOKEN_ENV = "EDGELINE_EVIDENCE_TOKEN"
OVERLAY_BGR = (0, 0, 255)
FILES = {"frame_jpeg": "frame.jpg", "mask_png": "mask.png", "overlay_jpeg": "overlay.jpg"}
RECORD_FILE = "evidence.json"
STATES = ("pending", "delivered", "refused")
RETRY_STATUSES = {408, 429}
Reason = Literal["alarm", "snapshot"]
Outcome = Literal["delivered", "refused", "retry"]


class EvidenceRate:
    """Which frames become evidence. Alarm runs are followed per camera and model, the spacing
    of records per camera; times are passed in (capture time), so it is tested without clocks."""

    def __init__(self, min_interval_s: float, min_gap_s: float) -> None:
        self.min_interval_s = min_interval_s
        self.min_gap_s = min_gap_s
        self._alarmed: dict[tuple[str, str], bool] = {}
        self._last_kept: dict[str, float] = {}

    def keep(self, camera: str, model: str, alarm: bool, snapshot: bool, now: float) -> Reason | None:
        """Whether this model output of ``camera``'s frame at ``now`` is kept, and why."""
        starts_run = alarm and not self._alarmed.get((camera, model), False)
        self._alarmed[(camera, model)] = alarm
        since = now - self._last_kept.get(camera, -math.inf)
        if snapshot:
            reason: Reason | None = "snapshot"
        elif alarm and since >= self.min_gap_s and (starts_run or since >= self.min_interval_s):
            reason = "alarm"
        else:
            return None
        self._last_kept[camera] = now
        return reason


@dataclass
class Candidate:
    """A frame to keep, until its result message is published (which gives ``result_msg_id``)."""

    evidence: Evidence
    image: np.ndarray
    mask: np.ndarray
    """Class-index mask (uint8, 0 = background) of the frame's size."""


def render(candidate: Candidate, jpeg_quality: int) -> EvidenceUpload:
    """The three images of a record: the frame (JPEG), the mask (PNG) and the overlay (JPEG)."""
    frame = candidate.image if candidate.image.ndim == 3 else cv2.cvtColor(candidate.image, cv2.COLOR_GRAY2BGR)
    overlay = frame.copy()
    contours, _ = cv2.findContours((candidate.mask > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(overlay, contours, -1, OVERLAY_BGR, thickness=max(2, round(min(frame.shape[:2]) / 150)))
    quality = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]
    return EvidenceUpload(evidence=candidate.evidence, frame_jpeg=_encode(".jpg", frame, quality),
                          mask_png=_encode(".png", candidate.mask.astype(np.uint8)),
                          overlay_jpeg=_encode(".jpg", overlay, quality))


def _encode(extension: str, image: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, data = cv2.imencode(extension, image, params or [])
    if not ok:
        raise ValueError(f"the image could not be encoded as {extension}")
    return data.tobytes()


class EvidenceStore:
    """Records on local disk, one folder each under ``pending/``, ``delivered/`` or ``refused/``,
    named ``<capture ms>-<msg_id>`` so that a listing is oldest first; bounded by ``max_bytes``."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.evicted: Counter[str] = Counter()
        self._lock = threading.Lock()
        for state in ("tmp", *STATES):
            (root / state).mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / "tmp")  # a record half written when the agent died
        (root / "tmp").mkdir()
        self._sizes = {state: {path.name: _folder_bytes(path) for path in sorted((root / state).iterdir())}
                       for state in STATES}

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(sum(sizes.values()) for sizes in self._sizes.values())

    def count(self, state: str) -> int:
        with self._lock:
            return len(self._sizes[state])

    def add(self, upload: EvidenceUpload) -> str:
        """Store a record as pending (then evict down to the bound); its folder name."""
        name = f"{int(upload.evidence.ts * 1000):013d}-{upload.evidence.msg_id}"
        staging = self.root / "tmp" / name
        staging.mkdir()
        (staging / RECORD_FILE).write_text(upload.evidence.model_dump_json(by_alias=True))
        for field, filename in FILES.items():
            (staging / filename).write_bytes(getattr(upload, field))
        size = _folder_bytes(staging)
        os.replace(staging, self.root / "pending" / name)
        with self._lock:
            self._sizes["pending"][name] = size
            self._sizes["pending"] = dict(sorted(self._sizes["pending"].items()))
        self._evict()
        return name

    def oldest_pending(self) -> str | None:
        with self._lock:
            return next(iter(self._sizes["pending"]), None)

    def read(self, name: str) -> EvidenceUpload:
        folder = self.root / "pending" / name
        evidence = Evidence.model_validate_json((folder / RECORD_FILE).read_bytes())
        return EvidenceUpload(evidence=evidence, **{field: (folder / filename).read_bytes()
                                                    for field, filename in FILES.items()})

    def move(self, name: str, state: Literal["delivered", "refused"]) -> None:
        """A pending record is done: delivered, or refused by central."""
        with self._lock:
            if name not in self._sizes["pending"]:
                return  # evicted meanwhile
            os.replace(self.root / "pending" / name, self.root / state / name)
            self._sizes[state][name] = self._sizes["pending"].pop(name)

    def _evict(self) -> None:
        with self._lock:
            while sum(sum(sizes.values()) for sizes in self._sizes.values()) > self.max_bytes:
                state = self._oldest_done() or "pending"
                if not self._sizes[state]:
                    return
                name = next(iter(self._sizes[state]))
                shutil.rmtree(self.root / state / name, ignore_errors=True)
                del self._sizes[state][name]
                self.evicted[state] += 1
                if state == "pending":
                    log.warning("evidence: the store is over %d bytes: undelivered record %s evicted",
                                self.max_bytes, name)

    def _oldest_done(self) -> str | None:
        """Of delivered and refused, the state holding the oldest record (None: both empty)."""
        heads = [(next(iter(self._sizes[state])), state) for state in ("delivered", "refused") if self._sizes[state]]
        return min(heads)[1] if heads else None


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())


def evidence_token(config: EvidenceConfig, machine: str, base_dir: Path,
                   environ: Mapping[str, str] = os.environ) -> str | None:
    """This machine's evidence token: from ``evidence.token_file``, else ``$EDGELINE_EVIDENCE_TOKEN``;
    :class:`ConfigError` when central_url is set and there is none, or the file cannot be read."""
    token = environ.get(EVIDENCE_TOKEN_ENV, "").strip() or None
    if config.token_file:
        path = Path(config.token_file.replace("{machine}", machine)).expanduser()
        path = path if path.is_absolute() else base_dir / path
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"edge:{machine}", [f"evidence.token_file: cannot read {path}: {exc.strerror}"]) from None
    if config.central_url and not token:
        raise ConfigError(f"edge:{machine}", [f"evidence.central_url is set but there is no token: evidence.token_file "
                                              f"or ${EVIDENCE_TOKEN_ENV} (`edgeline central machine-token`)"])
    return token


class EvidenceService(Service):
    """The ``write`` and ``deliver`` loops of one machine's evidence (see the module docstring)."""

    def __init__(self, machine: str, config: EvidenceConfig, base_dir: Path,
                 supervisor: Supervisor | None = None) -> None:
        super().__init__(f"evidence:{machine}", supervisor=supervisor)
        self.machine = machine
        self.config = config
        self.rate = EvidenceRate(config.min_interval_s, config.min_gap_s)
        root = evidence_path(config, machine, base_dir)
        try:
            self.store = EvidenceStore(root, config.max_bytes)
        except OSError as exc:
            raise ConfigError(f"edge:{machine}", [f"evidence.path: cannot use {root}: {exc.strerror or exc} (a "
                                                  "writable folder: relative paths are relative to the site file)"])
        self.token = evidence_token(config, machine, base_dir)
        self.kept: Counter[str] = Counter()
        """Records stored, by reason."""
        self.kept_by_camera: Counter[str] = Counter()
        self.dropped = 0
        self.delivered = 0
        self.refused = 0
        self.failed_attempts = 0
        self._queue: queue.Queue[Candidate] = queue.Queue(config.queue_size)
        self._stored = threading.Event()
        self.add_loop("write", self._write_loop)
        if config.central_url:
            self.add_loop("deliver", self._deliver_loop)

    def submit(self, candidate: Candidate) -> None:
        """From the inference loop: never blocks; a full queue drops the record (counted)."""
        try:
            self._queue.put_nowait(candidate)
        except queue.Full:
            self.dropped += 1
            log.warning("evidence:%s: queue full, dropped the %s record of %s", self.machine,
                        candidate.evidence.reason, candidate.evidence.camera)

    def _write_loop(self) -> None:
        while not (self.stopping.is_set() and self._queue.empty()):
            try:
                candidate = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self.store.add(render(candidate, self.config.jpeg_quality))
            self.kept[candidate.evidence.reason] += 1
            self.kept_by_camera[candidate.evidence.camera] += 1
            self._stored.set()

    def _deliver_loop(self) -> None:
        backoff = 1.0
        with httpx.Client(base_url=str(self.config.central_url).rstrip("/"), timeout=10.0,
                          headers={"Authorization": f"Bearer {self.token}"}) as client:
            while not self.stopping.is_set():
                name = self.store.oldest_pending()
                if name is None:
                    self._stored.wait(1.0)
                    self._stored.clear()
                    continue
                outcome = self._deliver(client, name)
                if outcome == "retry":
                    self.failed_attempts += 1
                    self.stopping.wait(backoff)
                    backoff = min(self.config.retry_max_s, backoff * 2)
                    continue
                backoff = 1.0
                self.store.move(name, outcome)
                if outcome == "delivered":
                    self.delivered += 1
                else:
                    self.refused += 1

    def _deliver(self, client: httpx.Client, name: str) -> Outcome:
        upload = self.store.read(name)
        try:
            response = client.put(f"/evidence/{upload.evidence.msg_id}", content=upload.model_dump_json(by_alias=True),
                                  headers={"Content-Type": "application/json"})
        except httpx.TransportError as exc:
            log.info("evidence:%s: central unreachable (%s); retrying", self.machine, exc)
            return "retry"
        if response.is_success:
            return "delivered"
        if response.status_code >= 500 or response.status_code in RETRY_STATUSES:
            log.info("evidence:%s: central answered %d; retrying", self.machine, response.status_code)
            return "retry"
        log.error("evidence:%s: central refused record %s: %d %s", self.machine, name, response.status_code,
                  response.text[:500])
        return "refused"


class EvidenceCollector(Collector):
    """The evidence service's counters and its store at scrape time."""

    def __init__(self, service: EvidenceService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        service, machine = self.service, [self.service.machine]
        kept = CounterMetricFamily("edgeline_edge_evidence_records", "Evidence records stored, by reason "
                                   "(alarm, snapshot)", labels=["machine", "reason"])
        for reason in ("alarm", "snapshot"):
            kept.add_metric([*machine, reason], service.kept[reason])
        evicted = CounterMetricFamily("edgeline_edge_evidence_evicted", "Records removed to keep the store under "
                                      "its bound, by state (pending: never delivered)", labels=["machine", "state"])
        for state in STATES:
            evicted.add_metric([*machine, state], service.store.evicted[state])
        stored = GaugeMetricFamily("edgeline_edge_evidence_stored", "Records in the local store, by state",
                                   labels=["machine", "state"])
        for state in STATES:
            stored.add_metric([*machine, state], service.store.count(state))
        yield from (kept, evicted, stored)
        yield _gauge("edgeline_edge_evidence_store_bytes", "Bytes of the local evidence store", machine,
                     service.store.bytes)
        for name, help_text, value in (
                ("dropped", "Records dropped because the encode queue was full", service.dropped),
                ("delivered", "Records central acknowledged", service.delivered),
                ("refused", "Records central refused (moved to refused/, not retried)", service.refused),
                ("delivery_failures", "Delivery attempts that failed and were retried", service.failed_attempts)):
            family = CounterMetricFamily(f"edgeline_edge_evidence_{name}", help_text, labels=["machine"])
            family.add_metric(machine, value)
            yield family


def _gauge(name: str, help_text: str, labels: list[str], value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_text, labels=["machine"])
    family.add_metric(labels, value)
    return family
