"""The stream's settings: the MQTT broker, the rules engine, the Kafka bridge and the workers,
and :class:`StreamSite`, the slice of the site file the stream's services read.

Plain pydantic, no Kafka import, so that loading a site file does not need the ``kafka`` extra.
The settings hold data; :func:`mqtt_settings` is the one place that reads the environment and
secret files for a broker login. ``edgeline.config`` composes this slice with the edge's and
central's into the site tree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from stream.messages import Identifier, MessageLimits
from stream.mqtt import MqttSettings
from stream.rule_config import RuleConfig
from stream.topics import KafkaTopics


class ConfigError(Exception):
    """A configuration that cannot be used; ``problems`` holds one ``path: what is wrong`` line each."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: invalid configuration\n" + "\n".join(problems))
        self.source = source
        self.problems = problems


class Strict(BaseModel):
    """Base of every settings model: unknown fields are refused, defaults are validated too."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


# ---------------------------------------------------------------- broker


class TlsConfig(Strict):
    ca_file: Path | None = Field(None, description="CA certificate that signed the broker's certificate")
    cert_file: Path | None = Field(None, description="client certificate (mutual TLS)")
    key_file: Path | None = Field(None, description="client private key (mutual TLS)")


class BrokerConfig(Strict):
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


def mqtt_settings(broker: BrokerConfig, machine: str | None = None, base_dir: Path = Path("."),
                  environ: Mapping[str, str] = os.environ) -> MqttSettings:
    """Connection settings of ``broker``, with the user name and password from ``environ`` and
    secret files; ``machine`` fills '{machine}' in the user name and password file."""
    tls = broker.tls or TlsConfig()
    username = environ.get("EDGELINE_MQTT_USERNAME") or broker.username
    if username and machine:
        username = username.replace("{machine}", machine)
    return MqttSettings(
        host=broker.host, port=broker.port, username=username,
        password=_password(broker, machine, base_dir, environ),
        ca_file=_opt_str(tls.ca_file), cert_file=_opt_str(tls.cert_file), key_file=_opt_str(tls.key_file),
        keepalive_s=broker.keepalive_s, reconnect_max_s=broker.reconnect_max_s,
    )


def _password(broker: BrokerConfig, machine: str | None, base_dir: Path, environ: Mapping[str, str]) -> str | None:
    if environ.get("EDGELINE_MQTT_PASSWORD"):
        return environ["EDGELINE_MQTT_PASSWORD"]
    if environ.get("EDGELINE_MQTT_PASSWORD_FILE"):
        return _read_secret(Path(environ["EDGELINE_MQTT_PASSWORD_FILE"]), "$EDGELINE_MQTT_PASSWORD_FILE")
    if broker.password_file:
        name = broker.password_file.replace("{machine}", machine) if machine else broker.password_file
        path = Path(name).expanduser()
        return _read_secret(path if path.is_absolute() else base_dir / path)
    return broker.password


def _read_secret(path: Path, source: str = "broker.password_file") -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(str(path), [f"{source}: cannot read {path}: {exc.strerror or exc}"]) from None


def _opt_str(path: Path | None) -> str | None:
    return str(path) if path is not None else None


# ---------------------------------------------------------------- rules engine, Kafka, workers


class EngineConfig(Strict):
    allowed_lateness_s: float = Field(2.0, ge=0, description="event-time lateness accepted before an observation is dropped")
    dedupe_ttl_s: float = Field(60.0, gt=0, description="how long a msg_id is remembered for dedupe, in event time "
                                "of its machine (redeliveries come right behind a machine's newest message)")
    dedupe_max_entries: int = Field(100_000, ge=1, description="embedded runner: most msg_ids remembered "
                                    "(50 machines at 10 messages/s for 60 s need 30,000)")
    max_rule_states: int = Field(10_000, ge=1, description="embedded runner: most (rule, scope key) states kept; "
                                 "beyond it the least recently updated is forgotten")


class WebhookConfig(Strict):
    url: Annotated[str, Field(pattern=r"^https?://")] = Field(description="alerts are POSTed here as JSON")
    timeout_s: float = Field(5.0, gt=0, le=120, description="per request")
    retries: int = Field(5, ge=0, le=100, description="retries after a failed POST (5xx, 429, no answer)")
    backoff_s: float = Field(0.5, gt=0, le=60, description="first wait between retries; doubles each time")
    headers: dict[str, str] = Field(default_factory=dict, description="extra HTTP headers, e.g. Authorization")


class BridgeSettings(Strict):
    """The MQTT->Kafka bridge's delivery and retries."""

    delivery_timeout_s: float = Field(120.0, ge=1, le=3600, description="how long the Kafka producer keeps "
                                      "trying a record (delivery.timeout.ms) before the bridge retries it itself")
    retry_first_s: float = Field(0.5, gt=0, le=60, description="wait before a record's first retry after Kafka "
                                 "failed it for a transient reason; doubles per attempt of that record")
    retry_max_s: float = Field(10.0, gt=0, le=600, description="longest wait between two retries of one record")
    shutdown_timeout_s: float = Field(10.0, ge=0, le=600, description="on stop, how long the records in flight "
                                      "get to be acknowledged by Kafka (and acked on MQTT); the broker redelivers "
                                      "the rest to the next bridge")
    linger_ms: int = Field(25, ge=0, le=1000, description="how long the Kafka producer waits to fill a batch "
                           "(linger.ms): 25 ms took 0.69x the bridge CPU of 5 ms at 1,000 msg/s (python -m bench.bridge), "
                           "for at most that much more latency")

    @model_validator(mode="after")
    def _first_within_max(self) -> BridgeSettings:
        if self.retry_first_s > self.retry_max_s:
            raise ValueError(f"retry_first_s ({self.retry_first_s}) is above retry_max_s ({self.retry_max_s})")
        return self


class WorkerGroupSettings(Strict):
    """The workers' consumer group (how fast it notices a dead member) and their batches."""

    session_timeout_s: float = Field(8.0, ge=1, le=1800, description="a worker whose heartbeats stop this long "
                                     "(a kill -9, a lost host) leaves the group and its partitions move (a worker "
                                     "started after a kill -9 processes about this long after its start); within "
                                     "the broker's group.min/max.session.timeout.ms (6 s .. 30 min by default)")
    heartbeat_interval_s: float = Field(1.0, gt=0, le=600, description="how often a worker tells the group it is "
                                        "alive; at most a third of session_timeout_s")
    rebalance_timeout_s: float = Field(20.0, ge=1, le=3600, description="how long a rebalance waits for every "
                                       "live member to rejoin")
    batch_max: int = Field(1000, ge=1, le=100_000, description="most records a worker takes in one batch: "
                           "parsed, deduped, evaluated and written back together")
    batch_ms: float = Field(100.0, gt=0, le=10_000, description="longest a worker waits for records "
                            "when none are there (the broker's fetch wait); what is there is taken at once")
    batch_deadline_s: float = Field(60.0, gt=0, le=3600, description="longest a batch may take to be processed "
                                    "and acknowledged by Kafka; past it the worker stops (exit non-zero, its "
                                    "supervisor restarts it) and the batch's records are read again")

    @model_validator(mode="after")
    def _heartbeats_fit_the_session(self) -> WorkerGroupSettings:
        if self.heartbeat_interval_s * 3 > self.session_timeout_s:
            raise ValueError(f"heartbeat_interval_s ({self.heartbeat_interval_s}) must be at most a third of "
                             f"session_timeout_s ({self.session_timeout_s})")
        return self


class StreamConfig(Strict):
    kafka: str = Field("127.0.0.1:9092", min_length=1, description="Kafka bootstrap servers (host:port[,host:port])")
    topic_prefix: str = Field("edgeline", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$",
                              description="Kafka topics are <prefix>.results, <prefix>.alerts, ...")
    partitions: int = Field(4, ge=1, le=1024, description="partitions of the pipeline topics: the most workers "
                            "that share the load (keyed by machine)")
    replication: int = Field(1, ge=1, le=16, description="replication factor of the topics Edgeline creates "
                             "(3 on a production cluster)")
    store: str = Field("memory://", pattern=r"^memory://$",
                       description="the workers' tables: memory:// (the only store: a worker rebuilds the partitions "
                       "it is given from their compacted changelogs in Kafka; rocksdb:// went with the Faust workers)")
    heartbeat_timeout_s: float = Field(15.0, gt=0, description="a machine silent this long raises an offline alert")
    webhook: WebhookConfig | None = Field(None, description="POST every alert here (retries, then dead-letter)")
    bridge: BridgeSettings = Field(default_factory=BridgeSettings, description="the MQTT->Kafka bridge's "
                                   "delivery, retries and shutdown")
    workers: WorkerGroupSettings = Field(default_factory=WorkerGroupSettings, description="the workers' "
                                         "consumer group: how fast a dead worker's partitions move to the others")

    def topics(self) -> KafkaTopics:
        return KafkaTopics(self.topic_prefix)


# ---------------------------------------------------------------- the stream's slice of the site


class MachineIdentity(Strict):
    """What the stream knows of a machine: its id and its production line."""

    id: Identifier = Field(description="machine id, unique in the site")
    line: Identifier = Field("line-1", description="production line the machine belongs to")


class StreamSite(Strict):
    """What the stream's services (bridge, rules runners, workers) read from the site file."""

    site: Identifier = Field(description="site id: first level of every topic")
    broker: BrokerConfig = Field(default_factory=BrokerConfig, description="MQTT broker")
    machines: Sequence[MachineIdentity] = Field(default_factory=list, max_length=1000, description="vision machines")
    rules: list[RuleConfig] = Field(default_factory=list, description="decision rules")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="rules engine settings")
    messages: MessageLimits = Field(default_factory=MessageLimits, description="what the rules runners, the "
                                    "bridge and the edge accept: timestamps near the receiver's clock, size")
    stream: StreamConfig = Field(default_factory=StreamConfig, description="Kafka bridge and workers")

    def lines(self) -> dict[str, str]:
        """machine id -> line id."""
        return {machine.id: machine.line for machine in self.machines}
