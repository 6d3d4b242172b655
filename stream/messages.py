"""Wire messages: pydantic schemas shared by edge, stream and central.

Every message is one JSON object with a versioned ``schema`` (``edgeline.<kind>/<n>``), a
``msg_id`` that stays the same across retries (consumers dedupe on it), the ``site`` and
``machine`` it belongs to, and ``ts``: capture time as UTC epoch seconds.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal, Union

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

IDENTIFIER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
Identifier = Annotated[str, Field(pattern=IDENTIFIER_PATTERN)]
"""Names that become MQTT topic levels: no '/', '+', '#' or spaces."""

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Scalar = str | int | FiniteFloat | bool
Severity = Literal["info", "warning", "critical"]
Scope = Literal["camera", "machine", "line"]
Timestamp = Annotated[float, Field(ge=0, allow_inf_nan=False)]
UnitFloat = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]

_MSG_ID_NAMESPACE = uuid.UUID("6f1c3c8e-8f5e-4d0e-9d2b-6a1f0e7c2b11")
KAFKA_MAX_REQUEST_BYTES = 1_048_576
"""Kafka's default ``max.request.size``: a message must fit in one record below it."""

Check = Literal["json", "schema", "size", "clock", "topic"]


class MessageError(ValueError):
    """Raised for bytes that are not a valid Edgeline message; ``reason`` says why, ``check``
    which check failed (a bounded label for metrics)."""

    def __init__(self, reason: str, check: Check = "schema") -> None:
        super().__init__(reason)
        self.reason = reason
        self.check = check


class MessageLimits(BaseModel):
    """What a receiver accepts beyond the schema: timestamps near its own clock, bounded size."""

    model_config = ConfigDict(extra="forbid")

    max_ahead_s: float = Field(86_400.0, gt=0, allow_inf_nan=False,
                               description="a timestamp further ahead of the receiver's clock is refused")
    max_age_s: float = Field(86_400.0, gt=0, allow_inf_nan=False,
                             description="a timestamp further behind the receiver's clock is refused (an edge "
                             "outbox holding messages longer than this loses them to the dead-letter place)")
    max_bytes: int = Field(900_000, ge=4096, lt=KAFKA_MAX_REQUEST_BYTES,
                           description="largest message accepted, in bytes (below Kafka's default max.request.size)")


DEFAULT_LIMITS = MessageLimits()


def new_msg_id() -> str:
    return uuid.uuid4().hex


def stable_msg_id(*parts: object) -> str:
    """A msg_id derived from what identifies the message, so a regenerated copy dedupes."""
    return uuid.uuid5(_MSG_ID_NAMESPACE, "/".join(str(p) for p in parts)).hex


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False, ser_json_inf_nan="null")


class Envelope(_Strict):
    """Fields every message carries."""

    SCHEMA: ClassVar[str]
    KIND: ClassVar[str]

    msg_id: Annotated[str, Field(min_length=8, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")] = Field(
        default_factory=new_msg_id
    )
    site: Identifier
    machine: Identifier
    ts: Timestamp

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()


# ---------------------------------------------------------------- results


class EncodedMask(_Strict):
    """A class-index mask as a PNG, base64-encoded: small, lossless, decodable anywhere."""

    format: Literal["png-b64"] = "png-b64"
    height: Annotated[int, Field(gt=0, le=8192)]
    width: Annotated[int, Field(gt=0, le=8192)]
    data: Annotated[str, Field(max_length=4_000_000)]

    @classmethod
    def encode(cls, mask: np.ndarray) -> "EncodedMask":
        ok, png = cv2.imencode(".png", mask.astype(np.uint8))
        if not ok:
            raise ValueError("mask could not be encoded as PNG")
        return cls(height=mask.shape[0], width=mask.shape[1], data=base64.b64encode(png.tobytes()).decode())

    def decode(self) -> np.ndarray:
        raw = np.frombuffer(base64.b64decode(self.data), dtype=np.uint8)
        mask = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED)
        if mask is None or mask.shape[:2] != (self.height, self.width):
            raise MessageError("mask data does not decode to the stated shape")
        return mask


class DefectRegion(_Strict):
    cls: Annotated[str, Field(min_length=1, max_length=64)]
    area: Annotated[int, Field(ge=0)]
    bbox: tuple[int, int, int, int] = Field(description="x, y, width, height in frame pixels")
    score: UnitFloat


class ModelOutput(_Strict):
    model: Identifier
    version: Annotated[str, Field(min_length=1, max_length=64)]
    latency_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    defect_ratio: UnitFloat
    regions: list[DefectRegion] = Field(default_factory=list, max_length=256)
    alarm: bool = Field(False, description="the package's image-level alarm fired on this frame")
    mask: EncodedMask | None = None
    reused: bool = Field(False, description="the change gate found the scene unchanged: the last inferred output")


class FrameResult(_Strict):
    seq: Annotated[int, Field(ge=0)]
    ts: Timestamp
    outputs: list[ModelOutput] = Field(min_length=1, max_length=2)
    gated: bool = Field(False, description="scene unchanged: outputs reused from the last inferred frame")


class Result(Envelope):
    """Inference results of one camera, grouped over a short window (one or more frames)."""

    SCHEMA: ClassVar[str] = "edgeline.result/1"
    KIND: ClassVar[str] = "result"
    schema_: Literal["edgeline.result/1"] = Field("edgeline.result/1", alias="schema")
    camera: Identifier
    frames: list[FrameResult] = Field(min_length=1, max_length=1000)


# ---------------------------------------------------------------- anomalies


MAX_TOP_CHANNELS = 8


class AlarmSpan(_Strict):
    """An alarm event of a sensor group as the edge runtime sees it (hysteresis included): where it
    started, where it ended (None while open), how high it went and which channels drove it."""

    start_seq: Annotated[int, Field(ge=0)]
    start_ts: Timestamp
    end_seq: Annotated[int, Field(ge=0)] | None = None
    end_ts: Timestamp | None = None
    peak_level: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(description="highest score / threshold")
    channels: list[Identifier] = Field(default_factory=list, max_length=MAX_TOP_CHANNELS,
                                       description="channels with the largest contribution at the peak, largest first")


class Anomaly(Envelope):
    """Anomaly score of one sensor group for one time step."""

    SCHEMA: ClassVar[str] = "edgeline.anomaly/1"
    KIND: ClassVar[str] = "anomaly"
    schema_: Literal["edgeline.anomaly/1"] = Field("edgeline.anomaly/1", alias="schema")
    group: Identifier
    seq: Annotated[int, Field(ge=0)]
    model: Identifier
    version: Annotated[str, Field(min_length=1, max_length=64)]
    score: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    threshold: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    is_anomaly: bool
    channel_scores: dict[Identifier, Annotated[float, Field(allow_inf_nan=False)]] = Field(default_factory=dict)
    top_channels: list[Identifier] = Field(default_factory=list, max_length=MAX_TOP_CHANNELS,
                                           description="channels with the largest contribution now, largest first")
    alarm: AlarmSpan | None = Field(None, description="the open alarm event, or the one that ended at this step")


# ---------------------------------------------------------------- heartbeats and events


class CameraStatus(_Strict):
    camera: Identifier
    state: Literal["ok", "reconnecting", "failed", "stopped"]
    fps: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    inferred_fps: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    latency_p50_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    latency_p95_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(
        0.0, description="what the rollout latency gate compares")
    latency_p99_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    queue_depth: Annotated[int, Field(ge=0)] = 0
    frames_dropped: Annotated[int, Field(ge=0)] = 0
    frames_gated: Annotated[int, Field(ge=0)] = 0
    shed: bool = Field(False, description="the overload policy infers only one frame in a few")
    models: list[str] = Field(default_factory=list, description="name:version of each loaded model")
    frames_inferred: Annotated[int, Field(ge=0)] = Field(0, description="frames inferred since the agent started")
    defect_frames: Annotated[int, Field(ge=0)] = Field(0, description="of those, frames whose image-level alarm "
                                                       "fired (central's alarm rate per camera)")
    defect_ratio: UnitFloat = Field(0.0, description="the defect ratio of the camera's latest result")


class ShadowStatus(_Strict):
    """A candidate model running beside the current one on sampled live frames (shadow mode)."""

    package: Annotated[str, Field(max_length=200)]
    frames: Annotated[int, Field(ge=0)] = 0
    agreement: UnitFloat = Field(1.0, description="pooled IoU of the two models' defect masks on the same frames")
    latency_ratio: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(
        0.0, description="candidate's inference time over the current model's on those frames")


class ModelHealth(_Strict):
    """How a model has done since its package was loaded: what rollout gates read (error rate,
    drift of the mean defect ratio against the version before)."""

    package: Annotated[str, Field(max_length=200)]
    frames: Annotated[int, Field(ge=0)] = Field(0, description="frames inferred since the package was loaded")
    errors: Annotated[int, Field(ge=0)] = Field(0, description="frames whose inference failed since then")
    defect_ratio_mean: UnitFloat = Field(0.0, description="mean defect ratio over those frames")


class Heartbeat(Envelope):
    SCHEMA: ClassVar[str] = "edgeline.heartbeat/1"
    KIND: ClassVar[str] = "heartbeat"
    schema_: Literal["edgeline.heartbeat/1"] = Field("edgeline.heartbeat/1", alias="schema")
    uptime_s: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    cameras: list[CameraStatus] = Field(default_factory=list, max_length=64)
    cpu_percent: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    rss_mb: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    outbox_depth: Annotated[int, Field(ge=0)] = 0
    outbox_dropped: Annotated[int, Field(ge=0)] = Field(0, description="messages the full outbox dropped so far")
    outbox_oldest_age_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(
        0.0, description="seconds the oldest message in the outbox has waited (0 when empty)")
    models: dict[Identifier, Annotated[str, Field(max_length=200)]] = Field(
        default_factory=dict, description="model name in the site config -> package id running "
        "(<name>-<version>-<precision>), what rollouts watch")
    shadow: dict[Identifier, ShadowStatus] = Field(default_factory=dict, description="model name -> its shadow run")
    health: dict[Identifier, ModelHealth] = Field(default_factory=dict, description="model name -> its health "
                                                  "since its package was loaded")
    restarts: dict[Annotated[str, Field(min_length=1, max_length=200)], Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict, max_length=256, description="supervised loop (<service>/<loop>) -> times it crashed "
        "and was restarted since the agent started")


class Event(Envelope):
    """Something that happened on a machine: a camera reconnecting, a model loaded, a command applied."""

    SCHEMA: ClassVar[str] = "edgeline.event/1"
    KIND: ClassVar[str] = "event"
    schema_: Literal["edgeline.event/1"] = Field("edgeline.event/1", alias="schema")
    name: Identifier
    level: Literal["debug", "info", "warning", "error"] = "info"
    text: Annotated[str, Field(max_length=2000)] = ""
    camera: Identifier | None = None
    details: dict[str, Scalar] = Field(default_factory=dict)


# ---------------------------------------------------------------- decisions, alerts, commands


class Command(Envelope):
    """An instruction to one machine (``machine``), optionally for one camera."""

    SCHEMA: ClassVar[str] = "edgeline.command/1"
    KIND: ClassVar[str] = "command"
    schema_: Literal["edgeline.command/1"] = Field("edgeline.command/1", alias="schema")
    name: Identifier
    camera: Identifier | None = None
    args: dict[str, Scalar] = Field(default_factory=dict)
    reason: Annotated[str, Field(max_length=500)] = ""


class Alert(Envelope):
    """A rule firing or resolving for a scope key (a camera, a machine or a line)."""

    SCHEMA: ClassVar[str] = "edgeline.alert/1"
    KIND: ClassVar[str] = "alert"
    schema_: Literal["edgeline.alert/1"] = Field("edgeline.alert/1", alias="schema")
    rule: Identifier
    state: Literal["firing", "resolved"]
    severity: Severity
    scope: Scope
    key: Annotated[str, Field(min_length=1, max_length=200)]
    value: Annotated[float, Field(allow_inf_nan=False)]
    text: Annotated[str, Field(max_length=2000)] = ""
    camera: Identifier | None = None
    line: Identifier | None = None


class Decision(Envelope):
    """Every state change of a rule for a scope key, with the actions it took."""

    SCHEMA: ClassVar[str] = "edgeline.decision/1"
    KIND: ClassVar[str] = "decision"
    schema_: Literal["edgeline.decision/1"] = Field("edgeline.decision/1", alias="schema")
    rule: Identifier
    state: Literal["firing", "resolved"]
    scope: Scope
    key: Annotated[str, Field(min_length=1, max_length=200)]
    value: Annotated[float, Field(allow_inf_nan=False)]
    actions: list[str] = Field(default_factory=list)


# ---------------------------------------------------------------- evidence (edge -> central over HTTP)


MAX_EVIDENCE_IMAGE_BYTES = 8 * 2**20


class Evidence(Envelope):
    """What the edge keeps of one alarmed (or snapshot) frame: its msg_id is the record's id,
    stable across delivery retries. Sent to central over HTTP with its images
    (:class:`EvidenceUpload`), never on MQTT."""

    SCHEMA: ClassVar[str] = "edgeline.evidence/1"
    KIND: ClassVar[str] = "evidence"
    schema_: Literal["edgeline.evidence/1"] = Field("edgeline.evidence/1", alias="schema")
    camera: Identifier
    seq: Annotated[int, Field(ge=0)] = Field(description="the frame's sequence number on its camera")
    result_msg_id: Annotated[str, Field(min_length=8, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")] | None = Field(
        None, description="the result message that carried this frame")
    model: Identifier
    version: Annotated[str, Field(min_length=1, max_length=64)]
    reason: Literal["alarm", "snapshot"]
    defect_ratio: UnitFloat
    regions: list[DefectRegion] = Field(default_factory=list, max_length=256)
    width: Annotated[int, Field(gt=0, le=8192)]
    height: Annotated[int, Field(gt=0, le=8192)]


EvidenceImage = Annotated[bytes, Field(min_length=1, max_length=MAX_EVIDENCE_IMAGE_BYTES)]


class EvidenceUpload(_Strict):
    """The body of ``PUT /evidence/{msg_id}``: the record and its three images, base64 in JSON."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")
    evidence: Evidence
    frame_jpeg: EvidenceImage
    mask_png: EvidenceImage = Field(description="class-index mask (0 = background), the frame's size")
    overlay_jpeg: EvidenceImage = Field(description="the frame with the mask's contours drawn on it")


Message = Annotated[
    Union[Result, Anomaly, Heartbeat, Event, Command, Alert, Decision], Field(discriminator="schema_")
]
MESSAGE_TYPES: tuple[type[Envelope], ...] = (Result, Anomaly, Heartbeat, Event, Command, Alert, Decision)
_MESSAGE_ADAPTER: TypeAdapter[Any] = TypeAdapter(Message)


def parse_message(data: bytes | str, limits: MessageLimits = DEFAULT_LIMITS, now: float | None = None) -> Envelope:
    """Parse one message from the wire and check it against ``limits`` with ``now`` (default: this
    machine's clock) as the receiver's time. Any bad input raises :class:`MessageError`, nothing else."""
    size = len(data.encode() if isinstance(data, str) else data)
    if size > limits.max_bytes:
        raise MessageError(f"message of {size} bytes is over the {limits.max_bytes} byte limit", "size")
    try:
        message = _MESSAGE_ADAPTER.validate_json(data)
    except ValidationError as exc:
        raise MessageError(_summarise(exc)) from None
    except (ValueError, RecursionError) as exc:
        raise MessageError(f"not a JSON message: {exc}", "json") from None
    check_clock(message, time.time() if now is None else now, limits)
    return message


def check_clock(message: Envelope, now: float, limits: MessageLimits = DEFAULT_LIMITS) -> None:
    """Raise :class:`MessageError` when a timestamp of the message (its own, or a frame's) is more
    than ``limits.max_ahead_s`` ahead of ``now`` or ``limits.max_age_s`` behind it."""
    frames = message.frames if isinstance(message, Result) else []
    times = [message.ts, *(frame.ts for frame in frames)]
    if now - limits.max_age_s <= min(times) and max(times) <= now + limits.max_ahead_s:
        return  # the common case, checked once per message
    for where, ts in [("ts", message.ts), *((f"frames.{i}.ts", f.ts) for i, f in enumerate(frames))]:
        if ts > now + limits.max_ahead_s:
            raise MessageError(f"{where} {ts:.10g} is {ts - now:.3g} s ahead of the receiver's clock "
                               f"(limit {limits.max_ahead_s:g} s)", "clock")
        if ts < now - limits.max_age_s:
            raise MessageError(f"{where} {ts:.10g} is {now - ts:.3g} s behind the receiver's clock "
                               f"(limit {limits.max_age_s:g} s)", "clock")


def _summarise(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False)[:5]:
        where = ".".join(str(part) for part in error["loc"]) or "message"
        problems.append(f"{where}: {error['msg']}")
    more = exc.error_count() - len(problems)
    return "; ".join(problems) + (f"; and {more} more" if more > 0 else "")
