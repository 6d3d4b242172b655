"""The edge's settings: cameras, sensor groups, machines, the model catalog, inference batching,
the outbox and the metrics endpoint, and :class:`EdgeSite`, the slice of the site file an edge
agent reads.

Camera defaults are resolved at validation: after loading, every camera of every machine is a
complete :class:`CameraConfig` (fps, resolution, queue size and gate threshold are plain values),
so edge code never restates a default. The helpers below are pure functions of the settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from models.package import BUILTIN_PACKAGES, MAX_CHANNELS, PackageSettings, SignatureConfig
from stream.messages import Identifier
from stream.settings import MachineIdentity, Strict, StreamSite

MAX_MODELS_PER_CAMERA = 2
BUILTIN_PREFIX = "builtin:"


# ---------------------------------------------------------------- cameras


class SyntheticSource(Strict):
    type: Literal["synthetic"] = Field("synthetic", description="a simulated conveyor with parts and defects")
    seed: int = Field(0, description="random seed: the same seed gives the same frames and defects")
    defect_rate: float = Field(0.15, ge=0, le=1, description="probability that a part carries a defect")
    part_speed: float = Field(0.2, gt=0, le=2, description="conveyor speed in frame widths per second")


class FileSource(Strict):
    type: Literal["file"] = Field("file", description="a video file")
    path: Path = Field(description="video file read with OpenCV")
    loop: bool = Field(True, description="start again at the end of the file")


class UrlSource(Strict):
    type: Literal["rtsp"] = Field("rtsp", description="a network stream (RTSP or HTTP)")
    url: Annotated[str, Field(pattern=r"^(rtsps?|https?)://")] = Field(description="RTSP or HTTP stream URL")


class UsbSource(Strict):
    type: Literal["usb"] = Field("usb", description="a USB (V4L2) camera")
    index: int = Field(0, ge=0, description="V4L2 device index (/dev/videoN)")


class GStreamerSource(Strict):
    type: Literal["gstreamer"] = Field("gstreamer", description="a GStreamer pipeline")
    pipeline: str = Field(min_length=1, description="GStreamer pipeline ending in appsink")


CameraSource = Annotated[
    SyntheticSource | FileSource | UrlSource | UsbSource | GStreamerSource, Field(discriminator="type")
]
Resolution = tuple[Annotated[int, Field(gt=0, le=8192)], Annotated[int, Field(gt=0, le=8192)]]


def _at_most_two_models(models: list[str]) -> list[str]:
    if len(models) > MAX_MODELS_PER_CAMERA:
        raise ValueError(f"at most {MAX_MODELS_PER_CAMERA} models per camera (got {len(models)})")
    if len(set(models)) != len(models):
        raise ValueError("a model is listed twice")
    return models


class CameraDefaults(Strict):
    fps: float = Field(10.0, gt=0, le=120, description="frames per second captured and offered to inference")
    resolution: Resolution = Field((320, 240), description="capture width, height in pixels")
    queue_size: int = Field(2, ge=1, le=64, description="latest-frame queue length; a full queue drops the oldest")
    gate_threshold: float = Field(0.0, ge=0, le=255, description="change gate: mean gray-level difference of "
                                  "32x24 thumbnails below which a frame reuses the last result; 0 = off")


class CameraConfig(CameraDefaults):
    """One camera; the :class:`CameraDefaults` fields it does not set come from the site's
    ``camera_defaults`` (filled in when the site is validated)."""

    id: Identifier = Field(description="camera id, unique on its machine")
    source: CameraSource = Field(default_factory=SyntheticSource, description="where frames come from")
    models: Annotated[list[Identifier], AfterValidator(_at_most_two_models)] = Field(
        default_factory=list, description="names from the top-level models catalog; 0, 1 or 2"
    )
    priority: int = Field(0, ge=-100, le=100, description="overload policy: lower-priority cameras are shed first")


# ---------------------------------------------------------------- sensors


class SensorChannel(Strict):
    """One channel of a sensor group; ``column`` and ``field`` default to ``name`` at validation."""

    name: Identifier = Field(description="channel name, as the group's model package names it")
    column: str = Field("", min_length=1, description="csv source: the CSV column (default: the name; "
                        "spaces are ignored, as in SKAB's 'Volume Flow RateRMS')")
    field: str = Field("", min_length=1, description="mqtt source: the JSON key (default: the name)")
    unit: str | None = Field(None, max_length=32, description="unit, for people (e.g. degC, bar)")
    min: float | None = Field(None, allow_inf_nan=False, description="lowest valid value: below it the value "
                              "is treated as missing and counted as out of range")
    max: float | None = Field(None, allow_inf_nan=False, description="highest valid value: above it the value "
                              "is treated as missing and counted as out of range")

    @model_validator(mode="before")
    @classmethod
    def _name_alone(cls, value: Any) -> Any:
        """A bare name is a channel; ``column`` and ``field`` default to the name (a channel
        without a name fails on the name alone)."""
        if isinstance(value, str):
            value = {"name": value}
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            value = {"column": value["name"], "field": value["name"]} | value
        return value

    @model_validator(mode="after")
    def _ordered_range(self) -> "SensorChannel":
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min:g}) is above max ({self.max:g})")
        return self


def _distinct_channels(channels: list[SensorChannel] | None) -> list[SensorChannel] | None:
    names = [channel.name for channel in channels or []]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"channel listed twice: {', '.join(twice)}")
    return channels


class SyntheticSensorSource(Strict):
    type: Literal["synthetic"] = Field("synthetic", description="a simulated pump")
    seed: int = Field(0, description="random seed of the simulated pump")
    anomaly_rate: float = Field(0.01, ge=0, le=1, description="chance per sample that an anomaly episode starts")


class CsvSensorSource(Strict):
    type: Literal["csv"] = Field("csv", description="a CSV file replayed in (scaled) real time")
    path: Path = Field(description="CSV file, relative to the site file; channels are read by column name")
    time_column: str | None = Field("auto", description="time column ('auto': datetime, timestamp, time or ts; "
                                    "null: none); steps longer than 1.5x the median are counted as gaps")
    separator: str | None = Field(None, min_length=1, max_length=1, description="column separator (default: "
                                  "',' ';' or tab, whichever the header line has most)")
    speed: float = Field(1.0, gt=0, description="replay speed: 1 is real time, 10 is ten times faster")
    loop: bool = Field(False, description="start again at the end of the file")


class MqttSensorSource(Strict):
    type: Literal["mqtt"] = Field("mqtt", description="JSON samples from a sensor gateway on MQTT")
    topic: str = Field(min_length=1, description="MQTT topic (filter) a sensor gateway publishes JSON objects on, "
                       "one key per channel (the channels' field)")


SensorSource = Annotated[SyntheticSensorSource | CsvSensorSource | MqttSensorSource, Field(discriminator="type")]


class SensorGroupConfig(Strict):
    id: Identifier = Field(description="sensor group id, unique on its machine (e.g. pump1)")
    source: SensorSource = Field(default_factory=SyntheticSensorSource, description="where samples come from")
    model: Identifier | None = Field(None, description="anomaly model name from the models catalog")
    rate_hz: float = Field(1.0, gt=0, le=1000, description="samples per second")
    channels: Annotated[list[SensorChannel] | None, AfterValidator(_distinct_channels)] = Field(
        None, min_length=1, max_length=MAX_CHANNELS, description="the group's channels: names, or objects with "
        "name, column, field, unit, min, max (default: its model package's channels; without a model, the "
        "synthetic pump's); they must be the package's, in any order")


# ---------------------------------------------------------------- machines, models, runtime


class MachineConfig(MachineIdentity):
    cameras: list[CameraConfig] = Field(default_factory=list, max_length=16, description="cameras on this machine")
    sensors: list[SensorGroupConfig] = Field(default_factory=list, max_length=64, description="sensor groups")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="this machine's agent serves metrics here "
                                     "instead of metrics.port: one port each when several agents share a box "
                                     "(0: pick a free one)")


class ModelRef(Strict):
    path: str = Field(description=f"model package folder: absolute, relative to this file, or '{BUILTIN_PREFIX}<name>'")
    providers: list[Literal["tensorrt", "cuda", "cpu"]] = Field(
        default_factory=lambda: ["cpu"], description="execution-provider preference, first available wins"
    )
    threads: int = Field(1, ge=0, le=64, description="intra-op threads per session (0: ONNX Runtime default)")
    calibration_steps: int | None = Field(
        None, ge=1, description="anomaly models: samples a sensor group calibrates on before it may alarm (default: the package's)"
    )
    profile: Identifier | None = Field(
        None, description="anomaly models: a settings profile the package carries (e.g. fast-start for short calibration)"
    )


class InferenceConfig(Strict):
    max_batch: int = Field(8, ge=1, le=64, description="most frames in one ONNX Runtime call")
    batch_wait_ms: float = Field(5.0, ge=0, le=1000, description="after the first frame is ready, wait this long "
                                 "for the other cameras' frames so they share one call")
    overload_high: float = Field(0.9, gt=0, le=1, description="inference busy share above which a camera is shed")
    overload_low: float = Field(0.6, gt=0, le=1, description="busy share below which a shed camera comes back")
    result_window_ms: float = Field(0.0, ge=0, le=60_000, description="group each camera's frame results into one "
                                    "message per window (0: one message per frame); e.g. 1000 at 50-machine sites")

    @model_validator(mode="after")
    def _ordered(self) -> "InferenceConfig":
        if self.overload_low >= self.overload_high:
            raise ValueError(f"overload_low ({self.overload_low:g}) must be below overload_high "
                             f"({self.overload_high:g})")
        return self


def _names_the_machine(value: str) -> str:
    if "{machine}" not in value:
        raise ValueError(f"must contain {{machine}}, so that machines sharing a box never share it (got {value!r})")
    return value


PerMachinePath = Annotated[str, AfterValidator(_names_the_machine)]
"""A file or folder path with ``{machine}`` in it: machines sharing a box never share it."""


class OutboxConfig(Strict):
    path: PerMachinePath = Field("edgeline-outbox-{machine}.sqlite", description="SQLite file of the "
                                 "store-and-forward outbox, one per machine: must contain {machine}; relative to "
                                 "the site file's folder")
    max_messages: int = Field(100_000, ge=10, description="size bound; the lowest priority is dropped first")


class EvidenceConfig(Strict):
    """Evidence of alarmed frames (:mod:`edge.evidence`): kept on local disk first, then delivered
    to central over HTTP."""

    enabled: bool = Field(True, description="keep evidence of alarmed frames and snapshots")
    path: PerMachinePath = Field("edgeline-evidence-{machine}", description="folder of the local evidence store, "
                                 "one per machine: must contain {machine}; relative to the site file's folder")
    max_bytes: int = Field(256 * 2**20, ge=2**20, description="size bound of the local store; the oldest "
                           "records go first (delivered ones before undelivered), each counted")
    min_interval_s: float = Field(5.0, ge=0, le=3600, description="per camera: at most one record this often "
                                  "while an alarm lasts (its first frame is always kept; snapshots always)")
    min_gap_s: float = Field(1.0, ge=0, le=3600, description="per camera: never two records closer than this, "
                             "even for alarms that flicker on and off (snapshots excepted)")
    jpeg_quality: int = Field(85, ge=10, le=100, description="JPEG quality of the frame and the overlay")
    queue_size: int = Field(4, ge=1, le=64, description="records waiting to be encoded; when full a new one is "
                            "dropped and counted, never the inference slowed")
    central_url: Annotated[str, Field(pattern=r"^https?://")] | None = Field(
        None, description="central's API to deliver evidence to (e.g. http://central:8080); none: keep it locally")
    token_file: str | None = Field(None, description="file holding this machine's evidence token (`edgeline "
                                   "central machine-token`), '{machine}' filled in, relative to the site file; "
                                   "else $EDGELINE_EVIDENCE_TOKEN")
    retry_max_s: float = Field(60.0, ge=1, le=3600, description="longest wait between delivery attempts")


class MetricsConfig(Strict):
    enabled: bool = Field(True, description="serve Prometheus metrics")
    host: str = Field("127.0.0.1", description="address the metrics endpoint binds")
    port: int = Field(9100, ge=0, le=65535, description="metrics port (0: pick a free one)")


# ---------------------------------------------------------------- the edge's slice of the site


class EdgeSite(StreamSite):
    """What an edge agent reads from the site file."""

    camera_defaults: CameraDefaults = Field(default_factory=CameraDefaults, description="merged into every camera")
    models: dict[Identifier, ModelRef] = Field(default_factory=dict, description="model catalog: name -> package")
    signatures: SignatureConfig = Field(default_factory=SignatureConfig, description="who may sign model packages")
    packages: PackageSettings = Field(default_factory=PackageSettings, description="package tar limits (central "
                                      "and edge) and the URLs the edge downloads packages from")
    machines: list[MachineConfig] = Field(default_factory=list, max_length=1000, description="vision machines")
    outbox: OutboxConfig = Field(default_factory=OutboxConfig, description="edge outbox")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus endpoint")
    inference: InferenceConfig = Field(default_factory=InferenceConfig, description="edge batching and overload")
    evidence: EvidenceConfig = Field(default_factory=EvidenceConfig, description="evidence of alarmed frames")

    @model_validator(mode="after")
    def _complete_cameras(self) -> "EdgeSite":
        """Every camera re-validated with the camera defaults filled in for what it does not set."""
        defaults = self.camera_defaults.model_dump()
        for machine in self.machines:
            machine.cameras = [
                CameraConfig.model_validate({**defaults, **{name: getattr(camera, name)
                                                            for name in camera.model_fields_set}})
                for camera in machine.cameras
            ]
        return self


def machine_config(site: EdgeSite, machine_id: str) -> MachineConfig:
    """The settings of one machine of ``site``; KeyError when it has none of that id."""
    for machine in site.machines:
        if machine.id == machine_id:
            return machine
    raise KeyError(f"no machine {machine_id!r} in site {site.site!r}")


def metrics_for(site: EdgeSite, machine_id: str) -> tuple[MetricsConfig, str]:
    """The metrics endpoint of one machine's agent, and the YAML path its port comes from."""
    for index, machine in enumerate(site.machines):
        if machine.id == machine_id and machine.metrics_port is not None:
            return site.metrics.model_copy(update={"port": machine.metrics_port}), f"machines[{index}].metrics_port"
    return site.metrics, "metrics.port"


def machine_path(template: str, machine: str, base_dir: Path) -> Path:
    """A :data:`PerMachinePath` of ``machine``: ``{machine}`` filled in, relative paths under ``base_dir``."""
    path = Path(template.replace("{machine}", machine)).expanduser()
    return path if path.is_absolute() else base_dir / path


def outbox_path(outbox: OutboxConfig, machine: str, base_dir: Path) -> Path:
    """The outbox file of ``machine``."""
    return machine_path(outbox.path, machine, base_dir)


def evidence_path(evidence: EvidenceConfig, machine: str, base_dir: Path) -> Path:
    """The evidence folder of ``machine``."""
    return machine_path(evidence.path, machine, base_dir)


def resolve_model_path(ref: ModelRef, base_dir: Path) -> Path:
    """Where a model package is: ``builtin:<name>`` among the shipped packages, else the path,
    relative paths under ``base_dir``."""
    if ref.path.startswith(BUILTIN_PREFIX):
        return BUILTIN_PACKAGES / ref.path[len(BUILTIN_PREFIX):]
    path = Path(ref.path).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()
