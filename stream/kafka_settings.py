"""Settings of the Kafka side of the stream (composed into ``stream`` by :mod:`edgeline.config`):
the bridge's delivery and retries, and how fast the Faust workers' group notices a dead member.

Plain pydantic, no Kafka import, so that loading a site file does not need the ``kafka`` extra."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class BridgeSettings(_Strict):
    delivery_timeout_s: float = Field(120.0, ge=1, le=3600, description="how long the Kafka producer keeps "
                                      "trying a record (delivery.timeout.ms) before the bridge retries it itself")
    retry_first_s: float = Field(0.5, gt=0, le=60, description="wait before a record's first retry after Kafka "
                                 "failed it for a transient reason; doubles per attempt of that record")
    retry_max_s: float = Field(10.0, gt=0, le=600, description="longest wait between two retries of one record")
    shutdown_timeout_s: float = Field(10.0, ge=0, le=600, description="on stop, how long the records in flight "
                                      "get to be acknowledged by Kafka (and acked on MQTT); the broker redelivers "
                                      "the rest to the next bridge")

    @model_validator(mode="after")
    def _first_within_max(self) -> BridgeSettings:
        if self.retry_first_s > self.retry_max_s:
            raise ValueError(f"retry_first_s ({self.retry_first_s}) is above retry_max_s ({self.retry_max_s})")
        return self


class WorkerGroupSettings(_Strict):
    session_timeout_s: float = Field(8.0, ge=1, le=1800, description="a worker whose heartbeats stop this long "
                                     "(a kill -9, a lost host) leaves the group and its partitions move (a worker "
                                     "started after a kill -9 processes about this long after its start); within "
                                     "the broker's group.min/max.session.timeout.ms (6 s .. 30 min by default)")
    heartbeat_interval_s: float = Field(1.0, gt=0, le=600, description="how often a worker tells the group it is "
                                        "alive; at most a third of session_timeout_s")
    rebalance_timeout_s: float = Field(20.0, ge=1, le=3600, description="how long a rebalance waits for every "
                                       "live member to rejoin")

    @model_validator(mode="after")
    def _heartbeats_fit_the_session(self) -> WorkerGroupSettings:
        if self.heartbeat_interval_s * 3 > self.session_timeout_s:
            raise ValueError(f"heartbeat_interval_s ({self.heartbeat_interval_s}) must be at most a third of "
                             f"session_timeout_s ({self.session_timeout_s})")
        return self
