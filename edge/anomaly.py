"""Streaming LSTM anomaly scoring: one step per sample, state carried per sensor group, batched.

The package holds a one-step LSTM forecaster: inputs ``x [B, C]`` (normalised sample), ``h`` and
``c`` ``[layers, B, hidden]``; outputs ``y [B, C]`` (forecast of the next normalised sample) and
the new state. With ``difference`` set in the preprocessing the graph takes ``x_t - x_{t-1}``
instead and forecasts the next difference (the forecast of ``x_{t+1}`` is ``x_t + y``): a level
that drifts away from the calibration level then changes nothing for the LSTM.
:class:`StreamingAnomalyModel` keeps ``(h, c)``, the last forecast and the smoothed
score of every sensor group, and scores all groups that have a new sample in ONE ``session.run``.

Score of sample t: mean over channels of ``((x_t - forecast_{t-1}) / residual_scale)^2`` (the
normalised forecast error) plus ``level_weight`` times the mean over channels of
``((v_t - level_mean) / level_std)^2`` (how far the raw sample sits from the calibration samples:
the error of a constant forecast, which catches sustained shifts a one-step forecaster follows),
smoothed with an EMA (``ema_alpha``); it alarms above the threshold.

Online calibration (``calibration_steps`` N > 0, the SKAB protocol with N = 400): each group
fits its own constants on its first N samples, during which it reports score 0 and never alarms:

1. samples ``[0, K)``, ``K = round(N * normalise_fraction)``: buffered; at K the group's input
   mean/std are fitted on them (the LSTM does not run yet, so these groups skip the batch);
2. samples ``[K, N)``: normalised with the group's mean/std and streamed through the LSTM from a
   zero state; the residuals after ``warmup_steps`` fit the group's per-channel residual scales,
   the level mean/std are fitted on all N samples, then the smoothed scores of those same
   calibration samples give the threshold: ``threshold_factor * quantile(scores, threshold_quantile)``;
3. from sample N on the group streams and alarms. The EMA carries on from the calibration scores.

With N = 0 the package's own mean/std, residual scales and threshold are used and only the first
``warmup_steps`` samples never alarm (a group's first sample scores 0). The pure helpers below
(:func:`fit_normalisation`, :func:`fit_residual_scale`, :func:`channel_errors`,
:func:`smooth_scores`, :func:`calibrated_threshold`) are the whole calibration; the offline reference in
``models.anomaly`` reuses them with a full-sequence torch forward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from edge.inference import ModelLoadError, PackagedModel, create_session
from models.package import AnomalyPostprocess, AnomalyPreprocess, Package


@dataclass(frozen=True)
class AnomalyScore:
    score: float
    threshold: float
    is_anomaly: bool
    channel_scores: dict[str, float]


@dataclass(frozen=True)
class Calibration:
    """Where each phase of a group's calibration ends, in samples since the group (re)started."""

    steps: int  # N: first sample that may alarm; 0 = no per-group calibration
    normalise: int  # K: samples that fit the input mean/std
    warmup: int  # LSTM steps after K whose residuals are not used

    @classmethod
    def of(cls, post: AnomalyPostprocess, steps: int | None = None) -> Calibration:
        n = post.calibration_steps if steps is None else int(steps)
        if n <= 0:
            return cls(0, 0, post.warmup_steps)
        k = max(1, round(n * post.normalise_fraction))
        if n - k - post.warmup_steps < 8:
            raise ValueError(f"calibration_steps={n} leaves fewer than 8 residuals after normalisation ({k}) "
                             f"and LSTM warm-up ({post.warmup_steps})")
        return cls(n, k, post.warmup_steps)


@dataclass
class _GroupState:
    h: np.ndarray  # layers, hidden
    c: np.ndarray
    mean: np.ndarray | None = None  # input normalisation (None while still buffering)
    std: np.ndarray | None = None
    scale: np.ndarray | None = None  # residual scales (None while calibrating)
    threshold: float | None = None
    level_mean: np.ndarray | None = None  # level term reference (fitted on all calibration samples)
    level_std: np.ndarray | None = None
    forecast: np.ndarray | None = None  # normalised forecast of the next sample
    previous: np.ndarray | None = None  # last normalised sample (difference models)
    smoothed: float | None = None
    steps: int = 0
    raw: list[np.ndarray] = field(default_factory=list)  # raw calibration samples
    residuals: list[np.ndarray] = field(default_factory=list)  # calibration residuals after the LSTM warm-up


def smooth(previous: float | None, raw: float, alpha: float) -> float:
    return raw if previous is None else alpha * raw + (1.0 - alpha) * previous


def smooth_scores(raw: np.ndarray, alpha: float) -> np.ndarray:
    """EMA of a score sequence exactly as the streaming model does it, step by step."""
    out, s = np.zeros(len(raw), np.float64), None
    for t, r in enumerate(np.asarray(raw, np.float64)):
        out[t] = s = smooth(s, float(r), alpha)
    return out


def fit_normalisation(raw: np.ndarray, min_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean/std of raw samples [T, C]; a std floor relative to the level keeps flat channels finite."""
    raw = np.asarray(raw, np.float64)
    mean, std = raw.mean(0), raw.std(0)
    return mean.astype(np.float32), np.maximum(std, min_scale * np.maximum(np.abs(mean), 1.0)).astype(np.float32)


def fit_residual_scale(residuals: np.ndarray, min_scale: float) -> np.ndarray:
    """Per-channel RMS of normalised forecast residuals [T, C], floored."""
    rms = np.sqrt((np.asarray(residuals, np.float64) ** 2).mean(0))
    return np.maximum(rms, min_scale).astype(np.float32)


def channel_errors(residuals: np.ndarray, scale: np.ndarray, values: np.ndarray, level_mean: np.ndarray | None,
                   level_std: np.ndarray | None, level_weight: float) -> np.ndarray:
    """Per-channel score terms [..., C]: squared scaled forecast residual + level_weight x squared level z."""
    errors = (np.asarray(residuals, np.float64) / scale) ** 2
    if level_weight and level_mean is not None:
        errors = errors + level_weight * ((np.asarray(values, np.float64) - level_mean) / level_std) ** 2
    return errors


def calibrated_threshold(smoothed: np.ndarray, post: AnomalyPostprocess) -> float:
    return float(post.threshold_factor * np.quantile(smoothed, post.threshold_quantile))


def apply_profile(post: AnomalyPostprocess, profile: str | None, ref: str = "package") -> AnomalyPostprocess:
    """The postprocess settings with a named profile's overrides applied (validated like the manifest)."""
    if profile is None:
        return post
    if profile not in post.profiles:
        raise ModelLoadError(f"{ref}: no postprocess profile {profile!r} (has: {', '.join(post.profiles) or 'none'})")
    overrides = post.profiles[profile]
    allowed = set(AnomalyPostprocess.model_fields) - {"kind", "residual_scale", "profiles"}
    if set(overrides) - allowed:
        raise ModelLoadError(f"{ref}: profile {profile!r} sets unknown fields {sorted(set(overrides) - allowed)}")
    try:
        return AnomalyPostprocess.model_validate(post.model_dump() | overrides)
    except ValueError as exc:
        raise ModelLoadError(f"{ref}: profile {profile!r}: {exc}") from None


class StreamingAnomalyModel(PackagedModel):
    """An anomaly package in one ONNX Runtime session, scoring many sensor groups per tick.

    ``calibration_steps`` overrides the package's per-group calibration length (``None``: the
    manifest's; 400 is the SKAB protocol; 0 turns per-group calibration off). ``profile`` picks
    one of the package's named postprocess profiles (``None``: the package's own settings).
    """

    def __init__(self, package: Package, providers: Sequence[str] = ("cpu",), threads: int = 1,
                 calibration_steps: int | None = None, profile: str | None = None) -> None:
        manifest = package.manifest
        pre, post = manifest.preprocess, manifest.postprocess
        if not isinstance(pre, AnomalyPreprocess) or not isinstance(post, AnomalyPostprocess):
            raise ModelLoadError(f"{package.ref}: task is {manifest.task!r}, not anomaly")
        post = apply_profile(post, profile, package.ref)
        self.package, self.pre, self.post, self.profile = package, pre, post, profile
        self.calibration = Calibration.of(post, calibration_steps)
        self._quiet_steps = max(self.calibration.steps, self.calibration.warmup)  # samples that never alarm
        self.channels = tuple(pre.channels)
        self._mean = np.asarray(pre.mean, np.float32)
        self._std = np.asarray(pre.std, np.float32)
        self._scale = np.asarray(post.residual_scale, np.float32)
        self.level_weight = post.level_weight
        self.session = create_session(package, providers, threads)
        self._inputs = [i.name for i in self.session.get_inputs()]
        self._groups: dict[str, _GroupState] = {}
        self._run(np.zeros((1, len(self.channels)), np.float32), *self._zero_state(1))  # warm-up

    @property
    def threshold(self) -> float:
        """The package's threshold: what a group reports until its own is calibrated."""
        return self.post.threshold

    @property
    def groups(self) -> list[str]:
        return list(self._groups)

    def group_threshold(self, group: str) -> float | None:
        """A group's threshold in use, or None while it is still calibrating (or unknown)."""
        state = self._groups.get(group)
        return None if state is None else state.threshold

    def reset(self, group: str) -> None:
        """Forget a group's state; its next sample starts afresh (and calibrates again)."""
        self._groups.pop(group, None)

    def step(self, samples: Mapping[str, np.ndarray]) -> dict[str, AnomalyScore]:
        """Score one new sample (channel values in manifest order) per group, in one batched run."""
        out: dict[str, AnomalyScore] = {}
        running: list[tuple[str, _GroupState, np.ndarray]] = []
        for name, values in samples.items():
            state = self._groups.get(name) or self._new_state()
            self._groups[name] = state
            x = np.asarray(values, np.float32).reshape(len(self.channels))
            if state.threshold is None:
                state.raw.append(x)
            if state.mean is None:  # still buffering raw samples for the input normalisation
                state.steps += 1
                if state.steps >= self.calibration.normalise:
                    state.mean, state.std = fit_normalisation(np.stack(state.raw), self.post.min_scale)
                out[name] = self._quiet()
            else:
                running.append((name, state, x))
        if running:
            self._run_groups(running, out)
        return {name: out[name] for name in samples}

    def _run_groups(self, running: list[tuple[str, _GroupState, np.ndarray]], out: dict[str, AnomalyScore]) -> None:
        """One batched LSTM step for the groups past their normalisation phase; scoring vectorised."""
        states = [s for _, s, _ in running]
        values = np.stack([v for _, _, v in running])
        x = (values - np.stack([s.mean for s in states])) / np.stack([s.std for s in states])
        feed = x
        if self.pre.difference:
            feed = x - np.stack([x[i] if s.previous is None else s.previous for i, s in enumerate(states)])
        y, h_out, c_out = self._run(feed, np.stack([s.h for s in states], axis=1), np.stack([s.c for s in states], axis=1))
        if self.pre.difference:
            y = x + y
        live = [i for i, s in enumerate(states) if s.threshold is not None and s.forecast is not None]
        if live:
            live_states = [states[i] for i in live]
            residual = x[live] - np.stack([s.forecast for s in live_states])
            level = self.level_weight and live_states[0].level_mean is not None
            errors = channel_errors(
                residual, np.stack([s.scale for s in live_states]), values[live],
                np.stack([s.level_mean for s in live_states]) if level else None,
                np.stack([s.level_std for s in live_states]) if level else None, self.level_weight)
            for i, row, raw in zip(live, errors.tolist(), errors.mean(1).tolist()):
                out[running[i][0]] = self._alarm(states[i], row, raw)
        for i, (name, state, _) in enumerate(running):
            if name not in out:
                out[name] = self._calibrate(state, x[i])
            state.h, state.c, state.forecast, state.previous = h_out[:, i], c_out[:, i], y[i], x[i]
            state.steps += 1

    def _alarm(self, state: _GroupState, errors: list[float], raw: float) -> AnomalyScore:
        state.smoothed = smooth(state.smoothed, raw, self.post.ema_alpha)
        alarm = state.steps >= self._quiet_steps and state.smoothed > state.threshold
        return AnomalyScore(state.smoothed, state.threshold, bool(alarm), dict(zip(self.channels, errors)))

    def _calibrate(self, state: _GroupState, x: np.ndarray) -> AnomalyScore:
        """A step of a group that cannot alarm yet: the LSTM's first step, or calibration residuals."""
        cal = self.calibration
        if state.forecast is not None and state.threshold is None:
            if state.steps >= cal.normalise + cal.warmup:
                state.residuals.append(x - state.forecast)
            if state.steps == cal.steps - 1:
                self._fit(state)
        return self._quiet()

    def _fit(self, state: _GroupState) -> None:
        residuals, raw = np.stack(state.residuals), np.stack(state.raw)
        state.scale = fit_residual_scale(residuals, self.post.min_scale)
        state.level_mean, state.level_std = fit_normalisation(raw, self.post.min_scale)
        errors = channel_errors(residuals, state.scale, raw[len(raw) - len(residuals):], state.level_mean,
                                state.level_std, self.level_weight)
        smoothed = smooth_scores(errors.mean(-1), self.post.ema_alpha)
        state.threshold = calibrated_threshold(smoothed, self.post)
        state.smoothed, state.raw, state.residuals = float(smoothed[-1]), [], []

    def _quiet(self) -> AnomalyScore:
        return AnomalyScore(0.0, self.post.threshold, False, {ch: 0.0 for ch in self.channels})

    def _new_state(self) -> _GroupState:
        h, c = self._zero_state(1)
        state = _GroupState(h=h[:, 0], c=c[:, 0])
        if not self.calibration.steps:
            state.mean, state.std, state.scale, state.threshold = self._mean, self._std, self._scale, self.post.threshold
        return state

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
