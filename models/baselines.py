"""Baseline anomaly detectors that ``bench.anomaly`` runs beside our streaming model, on the same files.

One interface: :meth:`Detector.fit` on a file's calibration rows (SKAB: its first 400; NAB: its
probation period; the bench fits on the first 75 % of them, :func:`fit_rows_of`, and keeps the
rest to set the threshold out of sample), then :meth:`Detector.score` on the whole file
``[T, C]`` gives ``[T]`` scores in which row t depends only on rows <= t (what a streaming
detector could emit at t; NaN while a detector is not ready, e.g. before its first full window).
One threshold rule for every method: ``median + factor x (quantile(q) - median)`` of the
held-out calibration scores (:class:`ThresholdRule`: the calibration spread above the median, so
that it means the same for scores with an offset, like the Isolation Forest's, as for scores from
zero); an alarm is a score above it.

* :class:`AlwaysAlarm` — alarms on every row (the floor F1 alone hides);
* :class:`RollingZ` — per channel, the distance of the sample from the mean of the previous
  ``window`` samples in their standard deviations; score = the largest over channels;
* :class:`PcaT2Q` — PCA fitted on the standardised calibration rows (components explaining 90 % of
  the variance): Hotelling's T² in the model plane and Q (squared prediction error) off it, each
  divided by its calibration 99th percentile; score = the larger (Q only where a residual exists);
* :class:`IsolationForestDetector` — scikit-learn's Isolation Forest on the standardised samples;
* :class:`ConvAE` — a small 1-D convolutional autoencoder (torch, CPU) on windows of ``window``
  rows; score = the reconstruction MSE of the window ending at t. Needs torch (the models extra).

Missing values (NaN) are replaced by the calibration mean before scoring. Fixed seeds.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

MIN_SCALE = 1e-6  # std floor relative to the level: a flat channel stays finite
HOLDOUT = 0.25  # share of the calibration rows kept out of the fit; their scores set the threshold


@dataclass(frozen=True)
class ThresholdRule:
    """``median + factor x (quantile(q) - median)`` of the calibration scores (factor 1: the
    quantile itself); NaN scores are ignored."""

    quantile: float = 0.99
    factor: float = 1.0

    def threshold(self, calibration_scores: np.ndarray) -> float:
        finite = np.asarray(calibration_scores, np.float64)
        finite = finite[np.isfinite(finite)]
        if not len(finite):
            raise ValueError("no finite calibration score: too few calibration rows for this detector")
        median, high = np.quantile(finite, [0.5, self.quantile])
        return float(median + self.factor * (high - median))


def fit_rows_of(calibration_rows: int, holdout: float = HOLDOUT) -> int:
    """How many of the calibration rows a detector is fitted on; the scores of the rest set its
    threshold. Held out because a detector scores the rows it was fitted on too well (an
    autoencoder reconstructs its own training noise), which would put the threshold inside
    normal behaviour."""
    return calibration_rows - max(1, round(holdout * calibration_rows))


def alarms_above(scores: np.ndarray, threshold: float) -> np.ndarray:
    """[T] bool: score > threshold (a NaN score never alarms)."""
    scores = np.asarray(scores, np.float64)
    return np.nan_to_num(scores, nan=-np.inf) > threshold


def _standardiser(calibration: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = np.nanmean(calibration, 0)
    std = np.nanstd(calibration, 0)
    return mean, np.maximum(std, MIN_SCALE * np.maximum(np.abs(mean), 1.0))


def _standardise(values: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return np.nan_to_num((np.asarray(values, np.float64) - mean) / std, nan=0.0)


class Detector(ABC):
    name: ClassVar[str]
    thresholded: ClassVar[bool] = True  # False: the detector's alarms do not come from a threshold

    @property
    def context(self) -> int:
        """Rows a score needs: ``score(values[t - context + 1 : t + 1])[-1]`` is ``score(values)[t]``
        (how a stream scores one new sample)."""
        return 1

    @abstractmethod
    def fit(self, calibration: np.ndarray) -> None:
        """Learn normal behaviour from the calibration rows ``[N, C]``."""

    @abstractmethod
    def score(self, values: np.ndarray) -> np.ndarray:
        """``[T]`` scores of the whole file ``[T, C]`` (calibration rows first); row t uses rows <= t."""


class AlwaysAlarm(Detector):
    name = "always-alarm"
    thresholded = False

    def fit(self, calibration: np.ndarray) -> None:
        return None

    def score(self, values: np.ndarray) -> np.ndarray:
        return np.ones(len(values))


class RollingZ(Detector):
    name = "rolling-z"

    def __init__(self, window: int = 100) -> None:
        self.window = window

    @property
    def context(self) -> int:
        return self.window + 1

    def fit(self, calibration: np.ndarray) -> None:
        self.mean, self.std = _standardiser(calibration)

    def score(self, values: np.ndarray) -> np.ndarray:
        x = np.where(np.isnan(values), self.mean, np.asarray(values, np.float64))
        out = np.full(len(x), np.nan)
        if len(x) <= self.window:
            return out
        past = sliding_window_view(x[:-1], self.window, axis=0)  # [T - w, C, w]: rows t-w .. t-1 for t >= w
        mean, std = past.mean(-1), past.std(-1)
        floor = MIN_SCALE * np.maximum(np.abs(mean), 1.0)
        out[self.window :] = (np.abs(x[self.window :] - mean) / np.maximum(std, floor)).max(-1)
        return out


class PcaT2Q(Detector):
    name = "pca-t2q"

    def __init__(self, explained: float = 0.9) -> None:
        self.explained = explained

    def fit(self, calibration: np.ndarray) -> None:
        self.mean, self.std = _standardiser(calibration)
        z = _standardise(calibration, self.mean, self.std)
        _, singular, vt = np.linalg.svd(z - z.mean(0), full_matrices=False)
        variance = singular**2 / max(1, len(z) - 1)
        share = np.cumsum(variance) / max(variance.sum(), 1e-12)
        k = int(np.searchsorted(share, self.explained) + 1)
        self.components, self.variance = vt[:k], np.maximum(variance[:k], 1e-12)
        t2, q = self._terms(z)
        self.t2_scale = float(np.quantile(t2, 0.99)) or 1.0
        self.q_scale = float(np.quantile(q, 0.99))

    def _terms(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        projected = z @ self.components.T
        t2 = (projected**2 / self.variance).sum(-1)
        q = ((z - projected @ self.components) ** 2).sum(-1)
        return t2, q

    def score(self, values: np.ndarray) -> np.ndarray:
        t2, q = self._terms(_standardise(values, self.mean, self.std))
        score = t2 / self.t2_scale
        return np.maximum(score, q / self.q_scale) if self.q_scale > 0 else score


class IsolationForestDetector(Detector):
    name = "isolation-forest"

    def __init__(self, trees: int = 100, seed: int = 0) -> None:
        self.trees, self.seed = trees, seed

    def fit(self, calibration: np.ndarray) -> None:
        from sklearn.ensemble import IsolationForest

        self.mean, self.std = _standardiser(calibration)
        self.forest = IsolationForest(n_estimators=self.trees, random_state=self.seed, n_jobs=1)
        self.forest.fit(_standardise(calibration, self.mean, self.std))

    def score(self, values: np.ndarray) -> np.ndarray:
        return -self.forest.score_samples(_standardise(values, self.mean, self.std))


class ConvAE(Detector):
    """Conv1d(C,32,7,/2) -> Conv1d(32,16,7,/2) -> two transposed convs back -> Conv1d(32,C,7); Adam,
    MSE on every window of the calibration rows (stride 1), ``epochs`` passes, batch 32."""

    name = "conv-ae"

    def __init__(self, window: int = 60, epochs: int = 20, seed: int = 0) -> None:
        if window % 4:
            raise ValueError("window must be a multiple of 4 (two stride-2 stages)")
        self.window, self.epochs, self.seed = window, epochs, seed

    @property
    def context(self) -> int:
        return self.window

    def fit(self, calibration: np.ndarray) -> None:
        import torch
        from torch import nn

        torch.manual_seed(self.seed)
        self.mean, self.std = _standardiser(calibration)
        channels = calibration.shape[1]
        self.net = nn.Sequential(
            nn.Conv1d(channels, 32, 7, stride=2, padding=3), nn.ReLU(),
            nn.Conv1d(32, 16, 7, stride=2, padding=3), nn.ReLU(),
            nn.ConvTranspose1d(16, 16, 7, stride=2, padding=3, output_padding=1), nn.ReLU(),
            nn.ConvTranspose1d(16, 32, 7, stride=2, padding=3, output_padding=1), nn.ReLU(),
            nn.Conv1d(32, channels, 7, padding=3))
        windows = self._windows(calibration)
        if not len(windows):
            raise ValueError(f"{self.name}: fewer calibration rows than its {self.window}-row window")
        optimiser = torch.optim.Adam(self.net.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(self.seed)
        self.net.train()
        for _ in range(self.epochs):
            for batch in torch.randperm(len(windows), generator=generator).split(32):
                optimiser.zero_grad()
                loss = ((self.net(windows[batch]) - windows[batch]) ** 2).mean()
                loss.backward()
                optimiser.step()
        self.net.eval()

    def _windows(self, values: np.ndarray):  # noqa: ANN202 - a torch tensor [N, C, window]
        import torch

        z = _standardise(values, self.mean, self.std).astype(np.float32)
        if len(z) < self.window:
            return torch.zeros((0, z.shape[1], self.window))
        return torch.from_numpy(sliding_window_view(z, self.window, axis=0).copy())

    def score(self, values: np.ndarray) -> np.ndarray:
        import torch

        out = np.full(len(values), np.nan)
        windows = self._windows(values)
        with torch.no_grad():
            errors = [((self.net(chunk) - chunk) ** 2).mean((1, 2)) for chunk in windows.split(4096)]
        if errors:
            out[self.window - 1 :] = torch.cat(errors).numpy()
        return out


def torch_missing() -> str | None:
    """Why the Conv-AE cannot run here, or None."""
    return None if importlib.util.find_spec("torch") else "torch is not installed (pip install edgeline[models])"


def baselines(seed: int = 0) -> list[Detector]:
    """Every baseline this machine can run, in table order (the Conv-AE only with torch)."""
    out: list[Detector] = [AlwaysAlarm(), RollingZ(), PcaT2Q(), IsolationForestDetector(seed=seed)]
    return out + ([ConvAE(seed=seed)] if torch_missing() is None else [])
