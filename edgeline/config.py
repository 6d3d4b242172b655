"""The site configuration: one pydantic tree, loaded from YAML by :func:`load`.

Errors name the YAML path of each problem (``machines[1].cameras[0].models: at most 2 models
per camera``). Camera defaults are merged into every camera after validation, so edge code reads
one complete :class:`CameraConfig` per camera.
"""

from __future__ import annotations

import csv
import os
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import models
from edge.synthetic import CHANNELS as PUMP_CHANNELS
from models.package import (MANIFEST_FILE, MAX_CHANNELS, AnomalyPreprocess, Manifest, PackageError, PackageSettings,
                            is_package_tar, read_manifest)
from models.series import column_key, sniff_separator
from models.signing import builtin_trusted_keys, load_public_keys

from stream.messages import IDENTIFIER_PATTERN, Identifier, MessageLimits
from stream.kafka_settings import BridgeSettings, WorkerGroupSettings
from stream.mqtt import MqttSettings
from stream.topics import KafkaTopics
from stream.rule_config import RuleConfig

MAX_MODELS_PER_CAMERA = 2
BUILTIN_PREFIX = "builtin:"
BUILTIN_PACKAGES = Path(models.__file__).resolve().parent / "packages"
"""Where ``builtin:<name>`` model paths point: the packages shipped inside the ``models`` package."""


class ConfigError(Exception):
    """A configuration that cannot be used; ``problems`` holds one ``path: what is wrong`` line each."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: invalid configuration\n" + "\n".join(problems))
        self.source = source
        self.problems = problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# ---------------------------------------------------------------- cameras


class SyntheticSource(_Strict):
    type: Literal["synthetic"] = "synthetic"
    seed: int = Field(0, description="random seed: the same seed gives the same frames and defects")
    defect_rate: float = Field(0.15, ge=0, le=1, description="probability that a part carries a defect")
    part_speed: float = Field(0.2, gt=0, le=2, description="conveyor speed in frame widths per second")


class FileSource(_Strict):
    type: Literal["file"] = "file"
    path: Path = Field(description="video file read with OpenCV")
    loop: bool = Field(True, description="start again at the end of the file")


class UrlSource(_Strict):
    type: Literal["rtsp"] = "rtsp"
    url: Annotated[str, Field(pattern=r"^(rtsps?|https?)://")] = Field(description="RTSP or HTTP stream URL")


class UsbSource(_Strict):
    type: Literal["usb"] = "usb"
    index: int = Field(0, ge=0, description="V4L2 device index (/dev/videoN)")


class GStreamerSource(_Strict):
    type: Literal["gstreamer"] = "gstreamer"
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


class CameraDefaults(_Strict):
    fps: float = Field(10.0, gt=0, le=120, description="frames per second captured and offered to inference")
    resolution: Resolution = Field((320, 240), description="capture width, height in pixels")
    queue_size: int = Field(2, ge=1, le=64, description="latest-frame queue length; a full queue drops the oldest")
    gate_threshold: float = Field(0.0, ge=0, le=255, description="change gate: mean gray-level difference of "
                                  "32x24 thumbnails below which a frame reuses the last result; 0 = off")


class CameraConfig(_Strict):
    id: Identifier = Field(description="camera id, unique on its machine")
    source: CameraSource = Field(default_factory=SyntheticSource, description="where frames come from")
    models: Annotated[list[Identifier], AfterValidator(_at_most_two_models)] = Field(
        default_factory=list, description="names from the top-level models catalog; 0, 1 or 2"
    )
    fps: float | None = Field(None, gt=0, le=120, description="overrides camera_defaults.fps")
    resolution: Resolution | None = Field(None, description="overrides camera_defaults.resolution")
    queue_size: int | None = Field(None, ge=1, le=64, description="overrides camera_defaults.queue_size")
    gate_threshold: float | None = Field(None, ge=0, le=255, description="overrides camera_defaults.gate_threshold")
    priority: int = Field(0, ge=-100, le=100, description="overload policy: lower-priority cameras are shed first")


# ---------------------------------------------------------------- sensors




class SensorChannel(_Strict):
    """One channel of a sensor group; ``column`` and ``field`` default to ``name`` at validation."""

    name: Identifier = Field(description="channel name, as the group's model package names it")
    column: str | None = Field(None, min_length=1, description="csv source: the CSV column (default: the name; "
                               "spaces are ignored, as in SKAB's 'Volume Flow RateRMS')")
    field: str | None = Field(None, min_length=1, description="mqtt source: the JSON key (default: the name)")
    unit: str | None = Field(None, max_length=32, description="unit, for people (e.g. degC, bar)")
    min: float | None = Field(None, allow_inf_nan=False, description="lowest valid value: below it the value "
                              "is treated as missing and counted as out of range")
    max: float | None = Field(None, allow_inf_nan=False, description="highest valid value: above it the value "
                              "is treated as missing and counted as out of range")

    @model_validator(mode="before")
    @classmethod
    def _name_alone(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _defaults_and_range(self) -> "SensorChannel":
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min:g}) is above max ({self.max:g})")
        self.column = self.column or self.name
        self.field = self.field or self.name
        return self


def _distinct_channels(channels: list[SensorChannel] | None) -> list[SensorChannel] | None:
    names = [channel.name for channel in channels or []]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"channel listed twice: {', '.join(twice)}")
    return channels


class SyntheticSensorSource(_Strict):
    type: Literal["synthetic"] = "synthetic"
    seed: int = Field(0, description="random seed of the simulated pump")
    anomaly_rate: float = Field(0.01, ge=0, le=1, description="chance per sample that an anomaly episode starts")


class CsvSensorSource(_Strict):
    type: Literal["csv"] = "csv"
    path: Path = Field(description="CSV file, relative to the site file; channels are read by column name")
    time_column: str | None = Field("auto", description="time column ('auto': datetime, timestamp, time or ts; "
                                    "null: none); steps longer than 1.5x the median are counted as gaps")
    separator: str | None = Field(None, min_length=1, max_length=1, description="column separator (default: "
                                  "',' ';' or tab, whichever the header line has most)")
    speed: float = Field(1.0, gt=0, description="replay speed: 1 is real time, 10 is ten times faster")
    loop: bool = Field(False, description="start again at the end of the file")


class MqttSensorSource(_Strict):
    type: Literal["mqtt"] = "mqtt"
    topic: str = Field(min_length=1, description="MQTT topic (filter) a sensor gateway publishes JSON objects on, "
                       "one key per channel (the channels' field)")


SensorSource = Annotated[SyntheticSensorSource | CsvSensorSource | MqttSensorSource, Field(discriminator="type")]


class SensorGroupConfig(_Strict):
    id: Identifier = Field(description="sensor group id, unique on its machine (e.g. pump1)")
    source: SensorSource = Field(default_factory=SyntheticSensorSource, description="where samples come from")
    model: Identifier | None = Field(None, description="anomaly model name from the models catalog")
    rate_hz: float = Field(1.0, gt=0, le=1000, description="samples per second")
    channels: Annotated[list[SensorChannel] | None, AfterValidator(_distinct_channels)] = Field(
        None, min_length=1, max_length=MAX_CHANNELS, description="the group's channels: names, or objects with "
        "name, column, field, unit, min, max (default: its model package's channels; without a model, the "
        "synthetic pump's); they must be the package's, in any order")


# ---------------------------------------------------------------- machines and site


class MachineConfig(_Strict):
    id: Identifier = Field(description="machine id, unique in the site")
    line: Identifier = Field("line-1", description="production line the machine belongs to")
    cameras: list[CameraConfig] = Field(default_factory=list, max_length=16, description="cameras on this machine")
    sensors: list[SensorGroupConfig] = Field(default_factory=list, max_length=64, description="sensor groups")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="this machine's agent serves metrics here "
                                     "instead of metrics.port: one port each when several agents share a box "
                                     "(0: pick a free one)")


class ModelRef(_Strict):
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


class SignatureConfig(_Strict):
    require: bool = Field(True, description="refuse model packages without a valid Ed25519 signature")
    trusted_keys: list[Path] = Field(
        default_factory=list, description="PEM public keys trusted to sign packages, besides the builtin packages' key"
    )


class TlsConfig(_Strict):
    ca_file: Path | None = Field(None, description="CA certificate that signed the broker's certificate")
    cert_file: Path | None = Field(None, description="client certificate (mutual TLS)")
    key_file: Path | None = Field(None, description="client private key (mutual TLS)")


class BrokerConfig(_Strict):
    host: str = Field("127.0.0.1", min_length=1, description="MQTT broker host")
    port: int = Field(1883, ge=1, le=65535, description="MQTT broker port")
    username: str | None = Field(None, description="MQTT user name; '{machine}' becomes the machine id on an edge "
                                 "agent (the site ACL's convention); $EDGELINE_MQTT_USERNAME overrides")
    password: str | None = Field(None, description="MQTT password (prefer password_file); $EDGELINE_MQTT_PASSWORD "
                                 "overrides")
    password_file: str | None = Field(None, description="file holding the MQTT password, relative to the site file; "
                                      "'{machine}' becomes the machine id (one secret per machine); "
                                      "$EDGELINE_MQTT_PASSWORD_FILE overrides")
    tls: TlsConfig | None = Field(None, description="TLS settings; absent means plain TCP")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keep-alive in seconds")
    reconnect_max_s: int = Field(30, ge=1, le=3600, description="longest wait between reconnect attempts "
                                 "(the wait doubles from 1 s up to this)")

    def _password(self, machine: str | None, base_dir: Path) -> str | None:
        if os.environ.get("EDGELINE_MQTT_PASSWORD"):
            return os.environ["EDGELINE_MQTT_PASSWORD"]
        if os.environ.get("EDGELINE_MQTT_PASSWORD_FILE"):
            return _read_secret(Path(os.environ["EDGELINE_MQTT_PASSWORD_FILE"]), "$EDGELINE_MQTT_PASSWORD_FILE")
        if self.password_file:
            name = self.password_file.replace("{machine}", machine) if machine else self.password_file
            path = Path(name).expanduser()
            return _read_secret(path if path.is_absolute() else base_dir / path)
        return self.password

    def mqtt_settings(self, machine: str | None = None, base_dir: Path = Path(".")) -> MqttSettings:
        """Connection settings; ``machine`` fills '{machine}' in the user name and password file."""
        tls = self.tls or TlsConfig()
        username = os.environ.get("EDGELINE_MQTT_USERNAME") or self.username
        if username and machine:
            username = username.replace("{machine}", machine)
        return MqttSettings(
            host=self.host, port=self.port, username=username, password=self._password(machine, base_dir),
            ca_file=_opt_str(tls.ca_file), cert_file=_opt_str(tls.cert_file), key_file=_opt_str(tls.key_file),
            keepalive_s=self.keepalive_s, reconnect_max_s=self.reconnect_max_s,
        )


def _read_secret(path: Path, source: str = "broker.password_file") -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(str(path), [f"{source}: cannot read {path}: {exc.strerror or exc}"]) from None


def _opt_str(path: Path | None) -> str | None:
    return str(path) if path is not None else None


class InferenceConfig(_Strict):
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


class OutboxConfig(_Strict):
    path: str = Field("edgeline-outbox-{machine}.sqlite", description="SQLite file of the store-and-forward outbox, "
                      "one per machine: must contain {machine}; relative to the site file's folder")
    max_messages: int = Field(100_000, ge=10, description="size bound; the lowest priority is dropped first")

    @field_validator("path")
    @classmethod
    def _one_file_per_machine(cls, value: str) -> str:
        if "{machine}" not in value:
            raise ValueError(f"must contain {{machine}} so that every machine gets its own file (got {value!r})")
        return value

    def path_for(self, machine: str, base_dir: Path) -> Path:
        path = Path(self.path.replace("{machine}", machine)).expanduser()
        return path if path.is_absolute() else base_dir / path


class MetricsConfig(_Strict):
    enabled: bool = Field(True, description="serve Prometheus metrics")
    host: str = Field("127.0.0.1", description="address the metrics endpoint binds")
    port: int = Field(9100, ge=0, le=65535, description="metrics port (0: pick a free one)")


class EngineConfig(_Strict):
    allowed_lateness_s: float = Field(2.0, ge=0, description="event-time lateness accepted before an observation is dropped")
    dedupe_ttl_s: float = Field(60.0, gt=0, description="how long a msg_id is remembered for dedupe, in event time "
                                "of its machine (redeliveries come right behind a machine's newest message)")
    dedupe_max_entries: int = Field(100_000, ge=1, description="embedded runner: most msg_ids remembered "
                                    "(50 machines at 10 messages/s for 60 s need 30,000)")
    max_rule_states: int = Field(10_000, ge=1, description="embedded runner: most (rule, scope key) states kept; "
                                 "beyond it the least recently updated is forgotten")


class WebhookConfig(_Strict):
    url: Annotated[str, Field(pattern=r"^https?://")] = Field(description="alerts are POSTed here as JSON")
    timeout_s: float = Field(5.0, gt=0, le=120, description="per request")
    retries: int = Field(5, ge=0, le=100, description="retries after a failed POST (5xx, 429, no answer)")
    backoff_s: float = Field(0.5, gt=0, le=60, description="first wait between retries; doubles each time")
    headers: dict[str, str] = Field(default_factory=dict, description="extra HTTP headers, e.g. Authorization")


class StreamConfig(_Strict):
    kafka: str = Field("127.0.0.1:9092", min_length=1, description="Kafka bootstrap servers (host:port[,host:port])")
    topic_prefix: str = Field("edgeline", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$",
                              description="Kafka topics are <prefix>.results, <prefix>.alerts, ...")
    partitions: int = Field(4, ge=1, le=1024, description="partitions of the pipeline topics: the most workers "
                            "that share the load (keyed by machine)")
    replication: int = Field(1, ge=1, le=16, description="replication factor of the topics Edgeline creates "
                             "(3 on a production cluster)")
    store: str = Field("memory://", pattern=r"^(memory|rocksdb|aerospike)://",
                       description="Faust table store: memory:// (state rebuilt from changelogs at start) or "
                       "rocksdb:// (needs rocksdict; on disk, fast restarts)")
    heartbeat_timeout_s: float = Field(15.0, gt=0, description="a machine silent this long raises an offline alert")
    webhook: WebhookConfig | None = Field(None, description="POST every alert here (retries, then dead-letter)")
    bridge: BridgeSettings = Field(default_factory=BridgeSettings, description="the MQTT->Kafka bridge's "
                                   "delivery, retries and shutdown")
    workers: WorkerGroupSettings = Field(default_factory=WorkerGroupSettings, description="the Faust workers' "
                                         "consumer group: how fast a dead worker's partitions move to the others")

    def topics(self) -> KafkaTopics:
        return KafkaTopics(self.topic_prefix)


class SiteConfig(_Strict):
    site: Identifier = Field(description="site id: first level of every topic")
    broker: BrokerConfig = Field(default_factory=BrokerConfig, description="MQTT broker")
    camera_defaults: CameraDefaults = Field(default_factory=CameraDefaults, description="merged into every camera")
    models: dict[Identifier, ModelRef] = Field(default_factory=dict, description="model catalog: name -> package")
    signatures: SignatureConfig = Field(default_factory=SignatureConfig, description="who may sign model packages")
    packages: PackageSettings = Field(default_factory=PackageSettings, description="package tar limits (central "
                                      "and edge) and the URLs the edge downloads packages from")
    machines: list[MachineConfig] = Field(default_factory=list, max_length=1000, description="vision machines")
    rules: list[RuleConfig] = Field(default_factory=list, description="decision rules")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="rules engine settings")
    messages: MessageLimits = Field(default_factory=MessageLimits, description="what the rules runners, the "
                                    "bridge and the edge accept: timestamps near the receiver's clock, size")
    outbox: OutboxConfig = Field(default_factory=OutboxConfig, description="edge outbox")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus endpoint")
    inference: InferenceConfig = Field(default_factory=InferenceConfig, description="edge batching and overload")
    stream: StreamConfig = Field(default_factory=StreamConfig, description="Kafka bridge and Faust workers")

    @model_validator(mode="after")
    def _merge_camera_defaults(self) -> "SiteConfig":
        for machine in self.machines:
            for camera in machine.cameras:
                for field in ("fps", "resolution", "queue_size", "gate_threshold"):
                    if getattr(camera, field) is None:
                        setattr(camera, field, getattr(self.camera_defaults, field))
        return self

    def machine(self, machine_id: str) -> MachineConfig:
        for machine in self.machines:
            if machine.id == machine_id:
                return machine
        raise KeyError(f"no machine {machine_id!r} in site {self.site!r}")

    def metrics_for(self, machine_id: str) -> tuple[MetricsConfig, str]:
        """The metrics endpoint of one machine's agent, and the YAML path its port comes from."""
        for index, machine in enumerate(self.machines):
            if machine.id == machine_id and machine.metrics_port is not None:
                return self.metrics.model_copy(update={"port": machine.metrics_port}), f"machines[{index}].metrics_port"
        return self.metrics, "metrics.port"

    def trusted_keys(self, base_dir: Path) -> list[Ed25519PublicKey] | None:
        """Keys a package must be signed by (builtin + configured), or None when signatures are not required."""
        if not self.signatures.require:
            return None
        keys = builtin_trusted_keys()
        for path in self.signatures.trusted_keys:
            keys += load_public_keys(base_dir / path)
        return keys

    def lines(self) -> dict[str, str]:
        """machine id -> line id."""
        return {machine.id: machine.line for machine in self.machines}


# ---------------------------------------------------------------- loading


def load(path: str | Path, broker: str | None = None) -> SiteConfig:
    """Read, validate and cross-check a site YAML file; raise :class:`ConfigError` on any problem.

    ``broker`` (``host:port``, from ``--broker`` or ``$EDGELINE_BROKER``) replaces the file's
    ``broker.host`` and ``broker.port``.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), [f"not UTF-8 text (byte {exc.start})"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [_yaml_problem(path, exc)]) from None
    if raw is None:
        raise ConfigError(str(path), ["(top level): the file is empty; a site file needs at least 'site: <id>'"])
    config = from_dict(raw, base_dir=path.parent, source=str(path))
    return config if broker is None else with_broker(config, broker)


def _yaml_problem(path: Path, exc: yaml.YAMLError) -> str:
    """``site.yaml:3:7: not valid YAML: <problem> (<context>, line 2)``: the file and line, not PyYAML's
    ``"<unicode string>"``."""
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return f"{path}: not valid YAML: {exc}".replace("<unicode string>", str(path)).replace("\n", " ")
    text = f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {getattr(exc, 'problem', None) or exc}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        text += f" ({context}, line {context_mark.line + 1})"
    elif context:
        text += f" ({context})"
    return text


BROKER_OVERRIDE = "--broker / $EDGELINE_BROKER"
HOST_NAME = re.compile(r"[A-Za-z0-9._:%-]+")


def with_broker(config: SiteConfig, address: str, source: str = BROKER_OVERRIDE) -> SiteConfig:
    """``config`` with its broker host and port replaced by ``address`` (``host:port``)."""
    try:
        host, port = parse_host_port(address)
    except ValueError as exc:
        raise ConfigError(source, [f"{source}: {exc}"]) from None
    return config.model_copy(update={"broker": config.broker.model_copy(update={"host": host, "port": port})})


def parse_host_port(address: str) -> tuple[str, int]:
    """``host:port`` or ``[ipv6]:port`` -> (host, port); ValueError saying what is wrong."""
    host, sep, port = address.strip().rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if not sep or not HOST_NAME.fullmatch(host):
        raise ValueError(f"expected host:port (e.g. 127.0.0.1:1883), got {address!r}")
    if ":" in host and not bracketed:
        raise ValueError(f"write an IPv6 address in brackets, e.g. [::1]:1883 (got {address!r})")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"port must be a number from 1 to 65535 (got {port!r} in {address!r})")
    return host, int(port)


def from_dict(raw: Any, base_dir: Path = Path("."), source: str = "<config>") -> SiteConfig:
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"(top level): expected a mapping, got {type(raw).__name__}"])
    try:
        config = SiteConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(source, [_describe(error, raw) for error in exc.errors(include_url=False)]) from None
    problems = _cross_check(config, base_dir)
    if problems:
        raise ConfigError(source, problems)
    return config


def resolve_model_path(ref: ModelRef, base_dir: Path) -> Path:
    if ref.path.startswith(BUILTIN_PREFIX):
        return BUILTIN_PACKAGES / ref.path[len(BUILTIN_PREFIX):]
    path = Path(ref.path).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


def _cross_check(config: SiteConfig, base_dir: Path) -> list[str]:
    """Checks that span the tree: unique ids, model names that exist, files that exist."""
    problems: list[str] = []
    for name, ref in config.models.items():
        package = resolve_model_path(ref, base_dir)
        if not (package / "manifest.json").is_file() and not (is_package_tar(package) and package.is_file()):
            problems.append(f"models.{name}.path: no model package (folder with manifest.json, or .tar) at {package}")
    for index, key in enumerate(config.signatures.trusted_keys):
        if not (base_dir / key).is_file():
            problems.append(f"signatures.trusted_keys[{index}]: file not found: {key}")
    problems += _duplicates("machines", [m.id for m in config.machines], "machine id")
    problems += _duplicates("rules", [r.name for r in config.rules], "rule name")
    problems += _shared_metrics_ports(config.machines)
    packages = _package_channels(config, base_dir)
    for i, machine in enumerate(config.machines):
        where = f"machines[{i}]"
        problems += _duplicates(f"{where}.cameras", [c.id for c in machine.cameras], "camera id")
        problems += _duplicates(f"{where}.sensors", [s.id for s in machine.sensors], "sensor group id")
        for j, camera in enumerate(machine.cameras):
            for k, model in enumerate(camera.models):
                if model not in config.models:
                    problems.append(f"{where}.cameras[{j}].models[{k}]: unknown model {model!r}{_known(config)}")
            if isinstance(camera.source, FileSource) and not (base_dir / camera.source.path).exists():
                problems.append(f"{where}.cameras[{j}].source.path: file not found: {camera.source.path}")
        for j, sensor in enumerate(machine.sensors):
            problems += _sensor_problems(f"{where}.sensors[{j}]", sensor, config, base_dir, packages)
    return problems


def _sensor_problems(where: str, sensor: SensorGroupConfig, config: SiteConfig, base_dir: Path,
                     packages: dict[str, list[str] | str]) -> list[str]:
    """Resolves the group's channels (declared, else its package's, else the pump's) and checks them
    against its model package, its source's CSV header and the synthetic pump."""
    if sensor.model is not None and sensor.model not in config.models:
        return [f"{where}.model: unknown model {sensor.model!r}{_known(config)}"]
    expected = packages.get(sensor.model) if sensor.model else None
    if isinstance(expected, str):
        return [f"{where}.model: {expected}"]
    if sensor.channels is None and (expected or isinstance(sensor.source, SyntheticSensorSource)):
        sensor.channels = [SensorChannel(name=name) for name in expected or PUMP_CHANNELS]
    declared = [channel.name for channel in sensor.channels or []]
    problems = []
    if expected is not None and sorted(declared) != sorted(expected):
        problems.append(f"{where}.channels: {_names(declared)} differ from the channels of model {sensor.model!r}: "
                        f"{_names(expected)}{_difference(declared, expected)}")
    unknown = sorted(set(declared) - set(PUMP_CHANNELS))
    if isinstance(sensor.source, SyntheticSensorSource) and unknown:
        problems.append(f"{where}.channels: the synthetic pump has no {_names(unknown)} (it has {_names(PUMP_CHANNELS)})")
    if isinstance(sensor.source, CsvSensorSource):
        problems += _csv_problems(where, sensor.source, sensor.channels, base_dir)
    if sensor.channels is None and sensor.model is None and not isinstance(sensor.source, SyntheticSensorSource):
        problems.append(f"{where}.channels: declare the group's channels (it has no model to take them from)")
    return problems


def _csv_problems(where: str, source: CsvSensorSource, channels: list[SensorChannel] | None,
                  base_dir: Path) -> list[str]:
    """The file exists and its header has the channels' columns (and the time column, when named)."""
    path = base_dir / source.path
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            header = handle.readline()
    except OSError:
        return [f"{where}.source.path: file not found: {source.path}"]
    sep = source.separator or sniff_separator(header)
    columns = {column_key(name) for name in next(csv.reader([header], delimiter=sep), [])}
    wanted = [channel.column or channel.name for channel in channels or []]
    if source.time_column not in (None, "auto"):
        wanted.append(source.time_column)
    absent = [name for name in wanted if column_key(name) not in columns]
    if not absent:
        return []
    return [f"{where}.source.path: {source.path} has no column {_names(absent)} "
            f"(its columns: {_names(sorted(columns))})"]


def _package_channels(config: SiteConfig, base_dir: Path) -> dict[str, list[str] | str]:
    """Model name -> the channels its package declares (its manifest only: no checksums, no ONNX), or
    why they cannot be read; only the models that sensor groups use and whose package exists."""
    used = {sensor.model for machine in config.machines for sensor in machine.sensors if sensor.model}
    out: dict[str, list[str] | str] = {}
    for name in sorted(used & set(config.models)):
        package = resolve_model_path(config.models[name], base_dir)
        try:
            manifest = _read_any_manifest(package)
        except FileNotFoundError:
            continue  # reported as models.<name>.path
        except (PackageError, OSError, tarfile.TarError, KeyError) as exc:
            out[name] = f"cannot read the manifest of model {name!r}: {exc}"
            continue
        except ValidationError as exc:
            errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)[:3])
            out[name] = f"cannot read the manifest of model {name!r}: {package}/{MANIFEST_FILE}: {errors}"
            continue
        if not isinstance(manifest.preprocess, AnomalyPreprocess):
            out[name] = f"model {name!r} is a {manifest.task} model, a sensor group needs an anomaly model"
        elif bad := [ch for ch in manifest.preprocess.channels if not re.fullmatch(IDENTIFIER_PATTERN, ch)]:
            out[name] = f"model {name!r} names channels that are not identifiers (letters, digits, _ . -): " + _names(bad)
        else:
            out[name] = list(manifest.preprocess.channels)
    return out


MAX_MANIFEST_BYTES = 1 << 20


def _read_any_manifest(package: Path) -> Manifest:
    """The manifest of a package folder, or read straight out of a package tar (nothing extracted)."""
    if package.is_dir():
        if not (package / MANIFEST_FILE).is_file():
            raise FileNotFoundError(package)
        return read_manifest(package)
    if not (is_package_tar(package) and package.is_file()):
        raise FileNotFoundError(package)
    with tarfile.open(package) as tar:
        member = tar.getmember(MANIFEST_FILE)
        handle = tar.extractfile(member) if member.isfile() and member.size <= MAX_MANIFEST_BYTES else None
        if handle is None:
            raise PackageError(f"{package}: {MANIFEST_FILE} is not a plain file under {MAX_MANIFEST_BYTES} bytes")
        return Manifest.model_validate_json(handle.read())


def _names(names: Sequence[str]) -> str:
    return "[" + ", ".join(names) + "]"


def _difference(declared: list[str], expected: list[str]) -> str:
    missing, extra = [n for n in expected if n not in declared], [n for n in declared if n not in expected]
    parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"not in the model {', '.join(extra)}"]
                                                                       if extra else [])
    return f" ({'; '.join(parts)})" if parts else ""


def _shared_metrics_ports(machines: list[MachineConfig]) -> list[str]:
    """Per-machine metrics ports exist for agents that share a box, so two alike are a clash."""
    first: dict[int, int] = {}
    problems = []
    for index, machine in enumerate(machines):
        port = machine.metrics_port
        if port and port in first:
            problems.append(f"machines[{index}].metrics_port: {port} is also machines[{first[port]}].metrics_port "
                            "(each agent on a box needs its own port)")
        elif port:
            first[port] = index
    return problems


def _known(config: SiteConfig) -> str:
    return f" (known: {', '.join(sorted(config.models))})" if config.models else " (the models catalog is empty)"


def _duplicates(where: str, ids: list[str], what: str) -> list[str]:
    seen: set[str] = set()
    problems = []
    for index, item in enumerate(ids):
        if item in seen:
            problems.append(f"{where}[{index}].id: duplicate {what} {item!r}")
        seen.add(item)
    return problems


def _describe(error: dict[str, Any], raw: Any) -> str:
    return f"{yaml_path(error['loc'], raw)}: {_message(error)}"


def _message(error: dict[str, Any]) -> str:
    message = str(error["msg"])
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    if error["type"] == "extra_forbidden":
        return "unknown field"
    if error["type"] == "union_tag_invalid":
        return message.replace("Input tag", "type").replace("found using 'type' ", "")
    return message


def yaml_path(loc: tuple[Any, ...], raw: Any) -> str:
    """``('machines', 1, 'cameras', 0, 'source', 'file', 'path')`` -> ``machines[1].cameras[0].source.path``.

    Pydantic puts union tags and validator names in the location; walking the raw document tells
    them apart from real keys, which are kept.
    """
    text = ""
    node = raw
    for position, part in enumerate(loc):
        last = position == len(loc) - 1
        if isinstance(part, int) and isinstance(node, list):
            text += f"[{part}]"
            node = node[part] if 0 <= part < len(node) else None
        elif isinstance(node, dict) and (part in node or last):
            text += f".{part}" if text else str(part)
            node = node.get(part)
        elif isinstance(node, dict) and isinstance(part, str) and part.startswith(("function-", "tagged-union")):
            continue
        elif isinstance(node, dict) and part not in node and node.get("type") == part:
            continue  # discriminated-union tag
        else:
            text += f".{part}" if text else str(part)
            node = None
    return text or "(top level)"
