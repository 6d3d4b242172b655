"""``anomaly-skab``: an LSTM forecaster trained on SKAB normal data, served as a stateful ONNX stream.

- Model: one LSTM layer (hidden 32) and a linear head forecasting the next normalised sample as
  ``x_t + head(h_t)``; exported as a ONE-STEP graph ``(x, h, c) -> (y, h_out, c_out)`` with a
  dynamic batch, so the edge carries ``(h, c)`` per sensor group and scores many groups per run.
- Normalisation is per file / per sensor group, as the edge does it online (see
  :mod:`edge.anomaly`): the first ``K = 200`` samples fit the input mean/std, the LSTM runs from a
  zero state from sample K, and samples ``K .. 400`` fit residual scales and the threshold.
  Training sequences are cut the same way: mean/std from the K samples before a window.
- Training data: ``anomaly-free/anomaly-free.csv`` plus the first 400 rows of every SKAB file
  found (the protocol's anomaly-free part); never a scored row, never a label.
- Evaluation: the SKAB protocol (:mod:`models.skab`) through the edge runtime on ONNX Runtime;
  parity of the step graph against torch; streaming vs full-sequence torch reference.

    python -m models.anomaly [--out models/packages]
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge.anomaly import (
    Calibration,
    StreamingAnomalyModel,
    calibrated_threshold,
    channel_errors,
    fit_normalisation,
    fit_residual_scale,
    smooth_scores,
)
from edge.synthetic import CHANNELS
from models import skab
from models.package import (
    AnomalyPostprocess,
    AnomalyPreprocess,
    Manifest,
    Package,
    TensorSpec,
    write_package,
)

log = logging.getLogger(__name__)

FAST_START = "fast-start"
FAST_START_OVERRIDES = {"calibration_steps": 80.0, "level_weight": 0.0, "ema_alpha": 0.3, "threshold_factor": 2.0}
"""A profile for a short calibration on a pump whose level drifts over minutes (the synthetic demo pump at
10-20 Hz): the level term would flag normal load drift a few seconds of calibration never saw, so the score
is the forecast error alone, less smoothed (short spikes), with a wider margin over a short calibration."""
NAME = "anomaly-skab"
VERSION = "1.0.0"
DEFAULT_OUT = Path(__file__).resolve().parent / "packages"


@dataclass(frozen=True)
class Recipe:
    """Model, training and calibration settings (few, chosen to generalise; see the report)."""

    hidden: int = 32
    layers: int = 1
    steps: int = 600
    batch: int = 32
    window: int = 128
    lr: float = 1e-2
    seed: int = 0
    calibration_steps: int = skab.PROTOCOL_STEPS
    normalise_fraction: float = 0.5
    warmup_steps: int = 10
    ema_alpha: float = 0.1
    threshold_quantile: float = 0.99
    threshold_factor: float = 1.25
    min_scale: float = 1e-3
    level_weight: float = 1.0

    def postprocess(self, residual_scale: np.ndarray, threshold: float) -> AnomalyPostprocess:
        return AnomalyPostprocess(
            residual_scale=[float(v) for v in residual_scale], threshold=float(threshold), ema_alpha=self.ema_alpha,
            warmup_steps=self.warmup_steps, calibration_steps=self.calibration_steps,
            normalise_fraction=self.normalise_fraction, threshold_quantile=self.threshold_quantile,
            threshold_factor=self.threshold_factor, min_scale=self.min_scale, level_weight=self.level_weight,
            profiles={FAST_START: dict(FAST_START_OVERRIDES)},
        )


TINY_RECIPE = Recipe(steps=5, batch=4, window=32)


class Forecaster(nn.Module):
    """Next-difference forecaster on normalised channels: dx_t = x_t - x_(t-1) in, head(LSTM(dx_<=t))
    out, so the forecast of x_(t+1) is x_t + output. Level-free: drift does not move its inputs."""

    def __init__(self, channels: int = len(CHANNELS), hidden: int = 32, layers: int = 1) -> None:
        super().__init__()
        self.lstm = nn.LSTM(channels, hidden, layers)
        self.head = nn.Linear(hidden, channels)

    def forward(self, dx: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
        out, state = self.lstm(dx, state)
        return self.head(out), state

    def forecast(self, x: torch.Tensor) -> torch.Tensor:
        """Forecasts [T, B, C] of x[t+1] for a whole normalised sequence x [T, B, C], from a zero state."""
        dx = torch.cat([torch.zeros_like(x[:1]), x[1:] - x[:-1]])
        return x + self(dx)[0]


class ForecasterStep(nn.Module):
    """One streaming step: (dx [B,C], h, c [layers,B,H]) -> (y [B,C] next difference, h_out, c_out)."""

    def __init__(self, forecaster: Forecaster) -> None:
        super().__init__()
        self.forecaster = forecaster

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        y, (h_out, c_out) = self.forecaster(x.unsqueeze(0), (h, c))
        return y[0], h_out, c_out


# ---------------------------------------------------------------- data


def training_series(root: Path | None = None) -> list[np.ndarray]:
    """Raw normal series: anomaly-free.csv and the first 400 rows (protocol-allowed) of every other file."""
    root = root or skab.skab_root()
    series = []
    for f in skab.load_folder(root):
        if f.labels is None:
            series.append(f.values)
        else:
            series.append(f.values[: skab.PROTOCOL_STEPS])
    if not series:
        raise FileNotFoundError(f"no SKAB files under {root} (set EDGELINE_DATA)")
    return series


def make_windows(series: list[np.ndarray], recipe: Recipe) -> np.ndarray:
    """Every admissible training window [N, window, C], normalised like the edge: stats of the K rows before it."""
    k = round(recipe.calibration_steps * recipe.normalise_fraction)
    out = []
    for values in series:
        w = min(recipe.window, len(values) - k)
        if w < 16:
            continue
        for s in range(k, len(values) - w + 1, 8):
            mean, std = fit_normalisation(values[s - k : s], recipe.min_scale)
            window = (values[s : s + w] - mean) / std
            if w < recipe.window:  # short file heads: pad by repeating the last row (loss masks it)
                window = np.concatenate([window, np.repeat(window[-1:], recipe.window - w, 0)])
            out.append(window)
    return np.clip(np.stack(out), -20, 20).astype(np.float32)


def train(series: list[np.ndarray], recipe: Recipe, tick=lambda n: None) -> Forecaster:
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    windows = torch.from_numpy(make_windows(series, recipe))
    model = Forecaster(hidden=recipe.hidden, layers=recipe.layers)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.1)
    skip = recipe.warmup_steps
    for _ in range(recipe.steps):
        batch = windows[rng.integers(len(windows), size=recipe.batch)].transpose(0, 1)  # T, B, C
        pred = model.forecast(batch[:-1])
        loss = nn.functional.smooth_l1_loss(pred[skip:], batch[1:][skip:])
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        tick(1)
    return model.eval()


# ---------------------------------------------------------------- reference (full sequence, torch)


def reference_stream(model: Forecaster, post: AnomalyPostprocess, values: np.ndarray,
                     calibration_steps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores and alarms [T] of one group as :class:`edge.anomaly.StreamingAnomalyModel` must give them,
    computed offline: one full-sequence torch forward from sample K, the same calibration helpers."""
    cal = Calibration.of(post, calibration_steps)
    n, k, warm = cal.steps, cal.normalise, cal.warmup
    scores, alarms = np.zeros(len(values)), np.zeros(len(values), bool)
    if n == 0 or len(values) <= n:
        raise ValueError("reference needs per-group calibration and more than N samples")
    values = np.asarray(values, np.float32)
    mean, std = fit_normalisation(values[:k], post.min_scale)
    x = ((values[k:] - mean) / std).astype(np.float32)
    with torch.no_grad():
        pred = model.forecast(torch.from_numpy(x)[:, None])
    residuals = x[1:] - pred[:-1, 0].numpy()  # residual of sample k+1+i
    first = k + max(warm, 1)  # first calibration sample with a residual in use
    scale = fit_residual_scale(residuals[first - k - 1 : n - k - 1], post.min_scale)
    level_mean, level_std = fit_normalisation(values[:n], post.min_scale)
    errors = channel_errors(residuals, scale, values[k + 1 :], level_mean, level_std, post.level_weight).mean(-1)
    smoothed = smooth_scores(errors[first - k - 1 : n - k - 1], post.ema_alpha)
    threshold = calibrated_threshold(smoothed, post)
    rest = errors[n - k - 1 :]  # samples n ..
    s, out = float(smoothed[-1]), []
    for r in rest:
        s = post.ema_alpha * r + (1 - post.ema_alpha) * s
        out.append(s)
    scores[n:] = out
    alarms[n:] = scores[n:] > threshold
    return scores, alarms


# ---------------------------------------------------------------- export, parity, package


def export_step(model: Forecaster) -> bytes:
    step, hidden, layers = ForecasterStep(model).eval(), model.lstm.hidden_size, model.lstm.num_layers
    args = (torch.zeros(1, len(CHANNELS)), torch.zeros(layers, 1, hidden), torch.zeros(layers, 1, hidden))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            step, args, buf, dynamo=False, opset_version=17,
            input_names=["x", "h", "c"], output_names=["y", "h_out", "c_out"],
            dynamic_axes={"x": {0: "batch"}, "h": {1: "batch"}, "c": {1: "batch"},
                          "y": {0: "batch"}, "h_out": {1: "batch"}, "c_out": {1: "batch"}},
        )
    return buf.getvalue()


def step_parity(model: Forecaster, onnx_path: Path, steps: int = 64, groups: int = 5) -> float:
    """Max abs difference of the forecasts, torch full sequence vs the ONNX step graph streamed, batched groups."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    xs = np.random.default_rng(2).normal(0, 1.5, (steps, groups, len(CHANNELS))).astype(np.float32)
    with torch.no_grad():
        ref, _ = model(torch.from_numpy(xs))
    h = c = np.zeros((model.lstm.num_layers, groups, model.lstm.hidden_size), np.float32)
    diff = 0.0
    for t in range(steps):
        y, h, c = session.run(None, {"x": xs[t], "h": h, "c": c})
        diff = max(diff, float(np.abs(y - ref[t].numpy()).max()))
    return diff


def manifest(model: Forecaster, recipe: Recipe, series: list[np.ndarray], metrics: dict[str, float]) -> Manifest:
    """Package-level constants: mean/std of the normal data (used only with calibration off) and the
    median per-series residual scales and thresholds (what a group reports while calibrating)."""
    allrows = np.concatenate(series)
    mean, std = fit_normalisation(allrows, recipe.min_scale)
    base = recipe.postprocess(np.ones(len(CHANNELS)), 1.0)
    scales, thresholds = [], []
    for values in series:
        if len(values) < recipe.calibration_steps + 1:
            continue
        cal = Calibration.of(base)
        k, first = cal.normalise, cal.normalise + max(cal.warmup, 1)
        m, s = fit_normalisation(values[:k], recipe.min_scale)
        x = ((values[k : cal.steps] - m) / s).astype(np.float32)
        with torch.no_grad():
            pred = model.forecast(torch.from_numpy(x)[:, None])
        res = (x[1:] - pred[:-1, 0].numpy())[first - k - 1 :]
        scale = fit_residual_scale(res, recipe.min_scale)
        lm, ls = fit_normalisation(values[: cal.steps], recipe.min_scale)
        errors = channel_errors(res, scale, values[first : cal.steps], lm, ls, recipe.level_weight).mean(-1)
        scales.append(scale)
        thresholds.append(calibrated_threshold(smooth_scores(errors, recipe.ema_alpha), base))
    hidden, layers = model.lstm.hidden_size, model.lstm.num_layers
    state = TensorSpec(name="h", shape=[layers, "batch", hidden])
    return Manifest(
        name=NAME, version=VERSION, task="anomaly",
        inputs=[TensorSpec(name="x", shape=["batch", len(CHANNELS)]), state, state.model_copy(update={"name": "c"})],
        outputs=[TensorSpec(name="y", shape=["batch", len(CHANNELS)]), state.model_copy(update={"name": "h_out"}),
                 state.model_copy(update={"name": "c_out"})],
        preprocess=AnomalyPreprocess(channels=list(CHANNELS), mean=mean.astype(float).tolist(),
                                     std=std.astype(float).tolist(), hidden_size=hidden, num_layers=layers,
                                     difference=True),
        postprocess=recipe.postprocess(np.median(scales, 0), float(np.median(thresholds))),
        metrics={"params": float(sum(p.numel() for p in model.parameters()))} | metrics,
    )


def skab_metrics(package: Package, root: Path) -> dict[str, float]:
    """The SKAB protocol through the edge runtime on every labelled file under ``root``."""
    files = [f for f in skab.load_folder(root) if f.labels is not None]
    results = skab.evaluate(StreamingAnomalyModel(package, calibration_steps=skab.PROTOCOL_STEPS), files)
    return {f"skab_{k}": v for k, v in skab.summary(results).items()}


def synthetic_metrics(package: Package, profile: str | None = FAST_START, rate_hz: float = 10.0,
                      samples: int = 3000) -> dict[str, float]:
    """Event metrics on synthetic demo pumps (edge.synthetic, 10 Hz) never seen in training, after the
    profile's short calibration; plus false alarm runs on pumps with nothing injected."""
    from edge.anomaly import event_metrics, runs, score_streams
    from edge.synthetic import SyntheticPump

    model = StreamingAnomalyModel(package, profile=profile)
    cal = model.calibration.steps
    data = [SyntheticPump(seed, rate_hz=rate_hz, anomaly_rate=0.03).generate(samples) for seed in range(30_000, 30_006)]
    _, alarms = score_streams(model, [v for v, _ in data])
    labels = np.stack([lab for _, lab in data])
    labels[:, :cal] = False  # episodes inside the calibration cannot be flagged
    m = event_metrics(labels.ravel(), alarms.ravel())
    normal = [SyntheticPump(seed, rate_hz=rate_hz, anomaly_rate=0.0).generate(samples)[0] for seed in range(30_100, 30_106)]
    _, quiet = score_streams(model, normal)
    return {"synth_event_f1": m["event_f1"], "synth_event_precision": m["event_precision"],
            "synth_event_recall": m["event_recall"], "synth_episodes": m["episodes"],
            "synth_normal_false_alarm_runs": float(sum(len(runs(a)) for a in quiet))}


def bench_step(package: Package, groups: int = 64, seconds: float = 1.0) -> dict[str, float]:
    model = StreamingAnomalyModel(package, calibration_steps=0)
    sample = {f"g{i}": np.asarray(package.manifest.preprocess.mean, np.float32) for i in range(groups)}
    model.step(sample)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model.step(sample)
        n += 1
    per_tick = (time.perf_counter() - t0) / n
    return {f"ms_per_tick_batch{groups}": 1000 * per_tick, f"us_per_sample_batch{groups}": 1e6 * per_tick / groups,
            "threads": 1.0}


def build_anomaly_package(out_dir: Path = DEFAULT_OUT, progress: bool = True, recipe: Recipe | None = None,
                          data: Path | None = None) -> Package:
    """Train on SKAB normal data, export, check parity, evaluate (SKAB protocol, synthetic pump), bench,
    and write ``<out_dir>/anomaly-skab`` (unsigned). A few minutes at most on one CPU core."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    recipe, root = recipe or Recipe(), data or skab.skab_root()
    folder = Path(out_dir) / NAME
    columns = (TextColumn("{task.description:<30}"), BarColumn(), TextColumn("{task.completed:>5.0f}/{task.total:.0f}"))
    with Progress(*columns, TimeElapsedColumn(), disable=not progress) as bar:
        task = bar.add_task("anomaly-skab: train", total=recipe.steps)
        series = training_series(root)
        t0 = time.perf_counter()
        model = train(series, recipe, lambda n: bar.advance(task, n))
        train_s = time.perf_counter() - t0
        bar.update(task, description="anomaly-skab: export + evaluate")
        onnx_bytes = export_step(model)
        package = write_package(folder, manifest(model, recipe, series, {"train_seconds": train_s}), onnx_bytes)
        metrics = {"onnx_parity_max_abs_diff": step_parity(model, package.model_path)}
        metrics |= skab_metrics(package, root)
        metrics |= synthetic_metrics(package)
        bench = bench_step(package)
    updated = package.manifest.model_copy(update={"metrics": package.manifest.metrics | metrics, "bench": bench})
    return write_package(folder, updated, onnx_bytes)


def main(out: Path = DEFAULT_OUT) -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    package = build_anomaly_package(out)
    shown = {k: float(f"{v:.4g}") for k, v in package.manifest.metrics.items()}
    print(f"{package.ref} -> {package.folder}: {shown} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    import typer

    typer.run(main)
