"""Streaming LSTM anomaly scoring: one step per sample, state carried per sensor group, batched.

The package holds a one-step LSTM forecaster: inputs ``x [B, C]`` (normalised sample), ``h`` and
``c`` ``[layers, B, hidden]``; outputs ``y [B, C]`` (forecast of the next normalised sample) and
the new state. :class:`StreamingAnomalyModel` keeps ``(h, c)``, the last forecast and the smoothed
score of every sensor group, and scores all groups that have a new sample in ONE ``session.run``.

Score of sample t: mean over channels of ``((x_t - forecast_{t-1}) / residual_scale)^2``,
smoothed with an EMA (``ema_alpha``); it alarms above the package's calibrated threshold,
except during the first ``warmup_steps`` samples of a group. A group's first sample scores 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edge.inference import ModelLoadError, PackagedModel, create_session
from models.package import AnomalyPostprocess, AnomalyPreprocess, Package


@dataclass(frozen=True)
class AnomalyScore:
    score: float
    threshold: float
    is_anomaly: bool
    channel_scores: dict[str, float]


@dataclass
class _GroupState:
    h: np.ndarray  # layers, hidden
    c: np.ndarray
    forecast: np.ndarray | None = None  # normalised forecast of the next sample
    smoothed: float | None = None
    steps: int = 0


def smooth(previous: float | None, raw: float, alpha: float) -> float:
    return raw if previous is None else alpha * raw + (1.0 - alpha) * previous


class StreamingAnomalyModel(PackagedModel):
    """An anomaly package in one ONNX Runtime session, scoring many sensor groups per tick."""

    def __init__(self, package: Package, providers: Sequence[str] = ("cpu",), threads: int = 1) -> None:
        manifest = package.manifest
        pre, post = manifest.preprocess, manifest.postprocess
        if not isinstance(pre, AnomalyPreprocess) or not isinstance(post, AnomalyPostprocess):
            raise ModelLoadError(f"{package.ref}: task is {manifest.task!r}, not anomaly")
        self.package, self.pre, self.post = package, pre, post
        self.channels = tuple(pre.channels)
        self._mean = np.asarray(pre.mean, np.float32)
        self._std = np.asarray(pre.std, np.float32)
        self._scale = np.asarray(post.residual_scale, np.float32)
        self.session = create_session(package, providers, threads)
        self._inputs = [i.name for i in self.session.get_inputs()]
        self._groups: dict[str, _GroupState] = {}
        self._run(np.zeros((1, len(self.channels)), np.float32), *self._zero_state(1))  # warm-up

    @property
    def threshold(self) -> float:
        return self.post.threshold

    @property
    def groups(self) -> list[str]:
        return list(self._groups)

    def reset(self, group: str) -> None:
        """Forget a group's state; its next sample starts afresh (scores 0, then warms up)."""
        self._groups.pop(group, None)

    def step(self, samples: Mapping[str, np.ndarray]) -> dict[str, AnomalyScore]:
        """Score one new sample (channel values in manifest order) per group, in one batched run."""
        if not samples:
            return {}
        names = list(samples)
        x = np.stack([np.asarray(samples[n], np.float32).reshape(len(self.channels)) for n in names])
        x = (x - self._mean) / self._std
        states = [self._groups.get(n) or self._new_state() for n in names]
        h = np.stack([s.h for s in states], axis=1)
        c = np.stack([s.c for s in states], axis=1)
        y, h_out, c_out = self._run(x, h, c)
        out = {}
        for i, (name, state) in enumerate(zip(names, states)):
            out[name] = self._score(state, x[i])
            state.h, state.c, state.forecast = h_out[:, i], c_out[:, i], y[i]
            state.steps += 1
            self._groups[name] = state
        return out

    def _score(self, state: _GroupState, x: np.ndarray) -> AnomalyScore:
        if state.forecast is None:
            return AnomalyScore(0.0, self.post.threshold, False, {ch: 0.0 for ch in self.channels})
        errors = ((x - state.forecast) / self._scale) ** 2
        state.smoothed = smooth(state.smoothed, float(errors.mean()), self.post.ema_alpha)
        alarm = state.steps >= self.post.warmup_steps and state.smoothed > self.post.threshold
        channel_scores = {ch: float(e) for ch, e in zip(self.channels, errors)}
        return AnomalyScore(state.smoothed, self.post.threshold, bool(alarm), channel_scores)

    def _new_state(self) -> _GroupState:
        h, c = self._zero_state(1)
        return _GroupState(h=h[:, 0], c=c[:, 0])

    def _zero_state(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.pre.num_layers, batch, self.pre.hidden_size)
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    def _run(self, x: np.ndarray, h: np.ndarray, c: np.ndarray) -> list[np.ndarray]:
        feeds = dict(zip(self._inputs, (x.astype(np.float32), h.astype(np.float32), c.astype(np.float32))))
        return self.session.run(None, feeds)


# ---------------------------------------------------------------- evaluation


def runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous runs of True as (start, end) half-open intervals."""
    padded = np.concatenate([[False], np.asarray(flags, bool), [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def event_metrics(labels: np.ndarray, alarms: np.ndarray, tolerance: int = 10) -> dict[str, float]:
    """Event-level precision/recall/F1 of alarms against labelled anomaly episodes.

    An episode counts as detected when any alarm falls inside it or within ``tolerance`` samples
    after its end (a forecaster also reacts to the return to normal). A run of consecutive alarms
    is a false alarm when it touches no such window. Precision = true alarm runs / all alarm runs,
    recall = detected episodes / episodes. Point-wise precision/recall and the mean detection
    delay (samples from episode start to first alarm) are reported too.
    """
    labels, alarms = np.asarray(labels, bool), np.asarray(alarms, bool)
    episodes, alarm_runs = runs(labels), runs(alarms)
    window = np.zeros(len(labels), bool)
    for start, end in episodes:
        window[start : min(len(labels), end + tolerance)] = True
    detected, delays = 0, []
    for start, end in episodes:
        hit = np.flatnonzero(alarms[start : min(len(labels), end + tolerance)])
        if len(hit):
            detected += 1
            delays.append(float(hit[0]))
    true_runs = sum(bool(window[s:e].any()) for s, e in alarm_runs)
    precision = true_runs / len(alarm_runs) if alarm_runs else 1.0
    recall = detected / len(episodes) if episodes else 1.0
    tp = int((labels & alarms).sum())
    return {
        "event_precision": precision,
        "event_recall": recall,
        "event_f1": _f1(precision, recall),
        "point_precision": tp / int(alarms.sum()) if alarms.any() else 1.0,
        "point_recall": tp / int(labels.sum()) if labels.any() else 1.0,
        "episodes": float(len(episodes)),
        "false_alarm_runs": float(len(alarm_runs) - true_runs),
    } | ({"mean_delay": float(np.mean(delays))} if delays else {})


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def score_streams(model: StreamingAnomalyModel, streams: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Run equally long streams ([T, C] each) as parallel groups; returns (scores[G,T], alarms[G,T])."""
    length = len(streams[0])
    scores = np.zeros((len(streams), length), np.float32)
    alarms = np.zeros((len(streams), length), bool)
    names = [f"eval{i}" for i in range(len(streams))]
    for name in names:
        model.reset(name)
    for t in range(length):
        result = model.step({name: stream[t] for name, stream in zip(names, streams)})
        for g, name in enumerate(names):
            scores[g, t], alarms[g, t] = result[name].score, result[name].is_anomaly
    for name in names:
        model.reset(name)
    return scores, alarms
