"""The configuration of one decision rule (validated; consumed by :mod:`stream.rules`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from stream.messages import Identifier, Scalar, Scope, Severity

Metric = Literal["defect_ratio", "defect_count", "max_score", "latency_ms", "alarm", "anomaly_score", "anomaly_level"]
RESULT_METRICS = ("defect_ratio", "defect_count", "max_score", "latency_ms", "alarm")
ANOMALY_METRICS = ("anomaly_score", "anomaly_level")
"""``anomaly_level`` is score / calibrated threshold: 1.0 is the threshold of whatever model made it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Condition(_Strict):
    op: Literal[">", ">=", "<", "<="] = Field(">=", description="comparison of the metric (or its rate) with value")
    value: float = Field(description="threshold the metric (or its change per second) is compared with")


class Match(_Strict):
    """Which observations a rule sees; empty lists mean all."""

    machines: list[Identifier] = Field(default_factory=list, description="only these machine ids")
    cameras: list[Identifier] = Field(default_factory=list, description="only these camera ids (results)")
    lines: list[Identifier] = Field(default_factory=list, description="only machines on these lines")
    models: list[Identifier] = Field(default_factory=list, description="only outputs of these model names")
    groups: list[Identifier] = Field(default_factory=list, description="only these sensor groups (anomalies)")


class AlertAction(_Strict):
    type: Literal["alert"] = Field("alert", description="send an alert when the rule fires and when it resolves")


class CommandAction(_Strict):
    type: Literal["command"] = Field("command", description="send a command to the machines in scope")
    name: Identifier = Field(description="command sent to the machine in scope (every machine of the line for scope line), e.g. snapshot")
    args: dict[str, Scalar] = Field(default_factory=dict, description="arguments of the command")
    on: Literal["firing", "resolved"] = Field("firing", description="send it when the rule fires or resolves")


Action = Annotated[AlertAction | CommandAction, Field(discriminator="type")]


class RuleConfig(_Strict):
    """One rule: which observations, what condition, how long, what to do.

    kind ``threshold`` tests every observation; ``k_of_n`` fires when at least ``k`` of the last
    ``n`` observations within ``window_s`` seconds (event time) meet the condition; ``rate_of_change``
    compares the metric's change per second over ``window_s`` with the condition. ``hold_for_s`` and
    ``clear_after_s`` add hysteresis: the condition must hold that long before firing, and stay false
    that long before resolving.
    """

    name: Identifier = Field(description="unique rule name; appears in alerts")
    description: str = Field("", description="text for humans, copied into alerts")
    kind: Literal["threshold", "k_of_n", "rate_of_change"] = Field("threshold", description="how the condition is evaluated")
    metric: Metric = Field(description="observed value: defect_ratio, defect_count, max_score, latency_ms, alarm (results; alarm is 1 when the package's image-level alarm fired); anomaly_score or anomaly_level (score / threshold)")
    condition: Condition = Field(description="comparison that makes an observation 'bad'")
    scope: Scope = Field("camera", description="state is kept per camera, per machine or per line")
    match: Match = Field(default_factory=Match, description="filters on machines, cameras, lines, models, groups")
    k: int = Field(1, ge=1, description="k_of_n: bad observations needed")
    n: int = Field(1, ge=1, description="k_of_n: observations looked at")
    window_s: float = Field(10.0, gt=0, description="k_of_n / rate_of_change: event-time window in seconds")
    hold_for_s: float = Field(0.0, ge=0, description="condition must hold this long before firing")
    clear_after_s: float = Field(0.0, ge=0, description="condition must be false this long before resolving")
    severity: Severity = Field("warning", description="info, warning or critical")
    actions: list[Action] = Field(default_factory=lambda: [AlertAction()], description="alert and/or commands")

    @model_validator(mode="after")
    def _check_kind(self) -> "RuleConfig":
        if self.k > self.n:
            raise ValueError(f"k ({self.k}) must not exceed n ({self.n})")
        return self

    @property
    def source(self) -> Literal["result", "anomaly"]:
        return "anomaly" if self.metric in ANOMALY_METRICS else "result"
