"""Quickstart: train, export, calibrate and evaluate the two first models in about a minute on CPU.

- ``seg-synth``: a tiny U-Net (3 levels, ~30k parameters) on synthetic belt frames, gray
  120x160 input, weighted BCE + dice, exported to ONNX with a sigmoid probability map output.
- ``anomaly-synth``: a one-layer LSTM forecaster (hidden 32) on normal synthetic pump data,
  exported as a ONE-STEP graph (x, h, c) -> (y, h_out, c_out) for stateful streaming, with
  residual scales and a score threshold calibrated on held-out normal data.

Both are checked for torch/ONNX Runtime parity and evaluated through the edge runtime
(``edge.inference``, ``edge.postprocess``, ``edge.anomaly``) on fresh seeds never used in
training; the metrics go into the manifests.

    python -m models.quickstart [--out models/packages] [--seed 0]
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from edge.anomaly import StreamingAnomalyModel, event_metrics, score_streams, smooth
from edge.inference import SegmentationModel, preprocess_frame
from edge.postprocess import region_mask, segmentation_metrics
from edge.synthetic import CHANNELS, SyntheticCamera, make_dataset, pump_dataset
from models.anomaly import ForecasterStep
from models.package import (
    AnomalyPostprocess,
    AnomalyPreprocess,
    Manifest,
    Package,
    SegmentationPostprocess,
    SegmentationPreprocess,
    TensorSpec,
    write_package,
)

log = logging.getLogger(__name__)

VERSION = "0.1.0"
SEG_H, SEG_W = 120, 160
FRESH_SEED = 10_000  # evaluation seeds start here; training and calibration stay below


@dataclass(frozen=True)
class Budget:
    """How much work each stage does; the defaults fit in about a minute on 2 CPU cores."""

    seg_frames_per_seed: int = 120
    seg_seeds: int = 5
    seg_steps: int = 1300
    seg_batch: int = 16
    seg_crop: int = 48
    lstm_steps: int = 500
    lstm_batch: int = 32
    lstm_window: int = 96
    lstm_train_samples: int = 20_000
    calib_samples: int = 10_000
    eval_frames: int = 240
    eval_pump_samples: int = 20_000
    eval_pump_groups: int = 4


TINY_BUDGET = Budget(
    seg_frames_per_seed=12, seg_seeds=2, seg_steps=6, seg_batch=4, lstm_steps=6, lstm_batch=4,
    lstm_train_samples=1000, calib_samples=600, eval_frames=12, eval_pump_samples=600, eval_pump_groups=2,
)


# ---------------------------------------------------------------- segmentation


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class TinyUNet(nn.Module):
    """Three-level encoder-decoder with skip connections; outputs a defect probability map."""

    def __init__(self, widths: tuple[int, int, int] = (8, 16, 32)) -> None:
        super().__init__()
        a, b, c = widths
        self.enc1, self.enc2, self.enc3 = _block(1, a), _block(a, b), _block(b, c)
        self.dec2, self.dec1 = _block(c + b, b), _block(b + a, a)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.head = nn.Conv2d(a, 1, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up(e3), e2], 1))
        d1 = self.dec1(torch.cat([self.up(d2), e1], 1))
        return self.head(d1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


def seg_spec() -> SegmentationPreprocess:
    return SegmentationPreprocess(height=SEG_H, width=SEG_W, grayscale=True, scale=1 / 255, mean=0.45, std=0.25)


def seg_data(seeds: range, frames: int, defect_rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Frames of several cameras as model inputs [N,1,h,w] and soft defect targets [N,1,h,w]."""
    spec, xs, ys = seg_spec(), [], []
    for seed in seeds:
        images, masks = make_dataset(seed, frames, defect_rate=defect_rate, stride=29)
        xs += [preprocess_frame(image, spec) for image in images]
        ys += [cv2.resize(m.astype(np.float32), (SEG_W, SEG_H), interpolation=cv2.INTER_AREA)[None] for m in masks]
    return np.stack(xs), np.stack(ys)


def _crops(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, batch: int, size: int) -> tuple[torch.Tensor, ...]:
    """Random crops, half of them centred near a defect pixel (the rare class)."""
    idx = rng.integers(len(x), size=batch)
    cx, cy = np.zeros((2, batch), int)
    for k, i in enumerate(idx):
        ys, xs = np.nonzero(y[i, 0] > 0.5)
        if k % 2 == 0 and len(xs):
            j = rng.integers(len(xs))
            cy[k], cx[k] = ys[j] + rng.integers(-size // 3, size // 3), xs[j] + rng.integers(-size // 3, size // 3)
        else:
            cy[k], cx[k] = rng.integers(SEG_H), rng.integers(SEG_W)
    y0 = np.clip(cy - size // 2, 0, SEG_H - size)
    x0 = np.clip(cx - size // 2, 0, SEG_W - size)
    xb = np.stack([x[i, :, a : a + size, b : b + size] for i, a, b in zip(idx, y0, x0)])
    yb = np.stack([y[i, :, a : a + size, b : b + size] for i, a, b in zip(idx, y0, x0)])
    flip = rng.random(batch) < 0.5
    xb[flip], yb[flip] = xb[flip, :, :, ::-1], yb[flip, :, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(xb)), torch.from_numpy(np.ascontiguousarray(yb))


def seg_loss(logits: torch.Tensor, target: torch.Tensor, pos_weight: float = 4.0) -> torch.Tensor:
    """Weighted BCE (defect pixels count ``pos_weight`` times) plus soft dice on the defect class."""
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(pos_weight))
    prob = torch.sigmoid(logits)
    dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
    return bce + dice


def train_segmentation(budget: Budget, seed: int, tick) -> TinyUNet:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x, y = seg_data(range(seed, seed + budget.seg_seeds), budget.seg_frames_per_seed, defect_rate=0.5)
    tick(0)
    model = TinyUNet()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=budget.seg_steps, pct_start=0.15)
    model.train()
    for _ in range(budget.seg_steps):
        xb, yb = _crops(x, y, rng, budget.seg_batch, budget.seg_crop)
        loss = seg_loss(model.logits(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        tick(1)
    return model.eval()


def export_segmentation(model: TinyUNet) -> bytes:
    buf = io.BytesIO()
    with _quiet():
        torch.onnx.export(
            model, (torch.zeros(1, 1, SEG_H, SEG_W),), buf, dynamo=False, opset_version=17,
            input_names=["image"], output_names=["prob"],
            dynamic_axes={"image": {0: "batch"}, "prob": {0: "batch"}},
        )
    return buf.getvalue()


def seg_manifest(params: int, flops: float) -> Manifest:
    return Manifest(
        name="seg-synth",
        version=VERSION,
        task="segmentation",
        inputs=[TensorSpec(name="image", shape=["batch", 1, SEG_H, SEG_W])],
        outputs=[TensorSpec(name="prob", shape=["batch", 1, SEG_H, SEG_W])],
        preprocess=seg_spec(),
        postprocess=SegmentationPostprocess(classes=["background", "defect"], threshold=0.5, min_area=12),
        metrics={"params": float(params), "gflops": flops / 1e9},
    )


def conv_flops(model: nn.Module, shape: tuple[int, ...]) -> float:
    """Multiply-adds x2 of the conv layers for one input of ``shape``."""
    total = 0.0

    def hook(module: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total += 2.0 * k * out.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(shape))
    for handle in handles:
        handle.remove()
    return total


def seg_parity(model: TinyUNet, package: Package) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(package.model_path), providers=["CPUExecutionProvider"])
    camera = SyntheticCamera(FRESH_SEED - 1, defect_rate=1.0)
    x = torch.from_numpy(np.stack([preprocess_frame(camera.frame(i).image, seg_spec()) for i in (5, 25, 45)]))
    with torch.no_grad():
        ref = model(x).numpy()
    return float(np.abs(session.run(None, {"image": x.numpy()})[0] - ref).max())


def evaluate_segmentation(package: Package, frames: int, seed: int = FRESH_SEED) -> dict[str, float]:
    """Run frames of fresh cameras through the edge runtime and score the kept regions."""
    model = SegmentationModel(package, threads=2)
    post = package.manifest.postprocess
    preds, truths, times = [], [], []
    per_camera = max(1, frames // 4)
    for cam_seed in range(seed, seed + 4):
        camera = SyntheticCamera(cam_seed, defect_rate=0.3)
        batch = [camera.frame(7 * i + 3) for i in range(per_camera)]
        for start in range(0, len(batch), 8):
            chunk = batch[start : start + 8]
            t0 = time.perf_counter()
            probs = model.infer([f.image for f in chunk])
            times.append((time.perf_counter() - t0) / len(chunk))
            preds += [region_mask(p, post.threshold, post.min_area) for p in probs]
            truths += [f.mask for f in chunk]
    metrics = segmentation_metrics(preds, truths, post.min_area)
    return {f"fresh_{k}": v for k, v in metrics.items()} | {"_ms_per_frame_batch8": 1000 * float(np.median(times))}


# ---------------------------------------------------------------- anomaly forecaster


class Forecaster(nn.Module):
    """Next-sample forecaster on normalised channels: y_t = x_t + head(LSTM(x_<=t))."""

    def __init__(self, channels: int = 8, hidden: int = 32, layers: int = 1) -> None:
        super().__init__()
        self.lstm = nn.LSTM(channels, hidden, layers)
        self.head = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
        out, state = self.lstm(x, state)
        return x + self.head(out), state


def train_forecaster(budget: Budget, seed: int, tick) -> tuple[Forecaster, np.ndarray, np.ndarray]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = np.stack([pump_dataset(s, budget.lstm_train_samples)[0] for s in range(seed, seed + 4)])
    mean, std = data.reshape(-1, 8).mean(0), data.reshape(-1, 8).std(0)
    norm = ((data - mean) / std).astype(np.float32)
    model = Forecaster()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=budget.lstm_steps, pct_start=0.1)
    w = budget.lstm_window
    for _ in range(budget.lstm_steps):
        which = rng.integers(len(norm), size=budget.lstm_batch)
        start = rng.integers(0, norm.shape[1] - w - 1, size=budget.lstm_batch)
        batch = torch.from_numpy(np.stack([norm[i, s : s + w + 1] for i, s in zip(which, start)]).transpose(1, 0, 2))
        pred, _ = model(batch[:-1])
        loss = nn.functional.mse_loss(pred[8:], batch[1:][8:])  # first steps: state still warming up
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        tick(1)
    return model.eval(), mean, std


def forecast_residuals(model: Forecaster, norm: np.ndarray) -> np.ndarray:
    """x_t - forecast_{t-1} for t >= 1 over sequences [G, T, C], from zero state (like streaming)."""
    with torch.no_grad():
        pred, _ = model(torch.from_numpy(norm.transpose(1, 0, 2).copy()))
    return norm[:, 1:] - pred.numpy().transpose(1, 0, 2)[:, :-1]


def stream_scores(residuals: np.ndarray, scale: np.ndarray, alpha: float) -> np.ndarray:
    """Smoothed scores [G, T-1] exactly as edge.anomaly computes them step by step."""
    raw = ((residuals / scale) ** 2).mean(axis=2)
    out = np.zeros_like(raw)
    for g in range(len(raw)):
        s = None
        for t, r in enumerate(raw[g]):
            out[g, t] = s = smooth(s, float(r), alpha)
    return out


def calibrate(model: Forecaster, mean: np.ndarray, std: np.ndarray, budget: Budget, seed: int) -> AnomalyPostprocess:
    """Residual scales and threshold from held-out normal pumps (seeds after the training ones)."""
    alpha, warmup = 0.3, 10
    data = np.stack([pump_dataset(s, budget.calib_samples)[0] for s in range(seed + 100, seed + 104)])
    residuals = forecast_residuals(model, ((data - mean) / std).astype(np.float32))
    scale = residuals[:, warmup:].reshape(-1, 8).std(0)
    scores = stream_scores(residuals, scale, alpha)[:, warmup:].ravel()
    threshold = max(1.4 * float(np.quantile(scores, 0.999)), 1.1 * float(scores.max()))
    return AnomalyPostprocess(
        residual_scale=scale.astype(float).tolist(), threshold=threshold, ema_alpha=alpha, warmup_steps=warmup
    )


def export_forecaster(model: Forecaster) -> bytes:
    step, hidden, layers = ForecasterStep(model).eval(), model.lstm.hidden_size, model.lstm.num_layers
    args = (torch.zeros(1, 8), torch.zeros(layers, 1, hidden), torch.zeros(layers, 1, hidden))
    buf = io.BytesIO()
    with _quiet():
        torch.onnx.export(
            step, args, buf, dynamo=False, opset_version=17,
            input_names=["x", "h", "c"], output_names=["y", "h_out", "c_out"],
            dynamic_axes={"x": {0: "batch"}, "h": {1: "batch"}, "c": {1: "batch"},
                          "y": {0: "batch"}, "h_out": {1: "batch"}, "c_out": {1: "batch"}},
        )
    return buf.getvalue()


def anomaly_manifest(model: Forecaster, mean, std, post: AnomalyPostprocess) -> Manifest:
    hidden, layers = model.lstm.hidden_size, model.lstm.num_layers
    state = TensorSpec(name="h", shape=[layers, "batch", hidden])
    return Manifest(
        name="anomaly-synth",
        version=VERSION,
        task="anomaly",
        inputs=[TensorSpec(name="x", shape=["batch", 8]), state, state.model_copy(update={"name": "c"})],
        outputs=[
            TensorSpec(name="y", shape=["batch", 8]),
            state.model_copy(update={"name": "h_out"}),
            state.model_copy(update={"name": "c_out"}),
        ],
        preprocess=AnomalyPreprocess(
            channels=list(CHANNELS), mean=mean.astype(float).tolist(), std=std.astype(float).tolist(),
            hidden_size=hidden, num_layers=layers,
        ),
        postprocess=post,
        metrics={"params": float(sum(p.numel() for p in model.parameters()))},
    )


def anomaly_parity(model: Forecaster, package: Package) -> float:
    """Max abs difference, torch vs ONNX Runtime, over a short multi-group streamed sequence."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(package.model_path), providers=["CPUExecutionProvider"])
    xs = np.random.default_rng(2).normal(0, 1, (20, 3, 8)).astype(np.float32)
    with torch.no_grad():
        ref, _ = model(torch.from_numpy(xs))
    h = c = np.zeros((model.lstm.num_layers, 3, model.lstm.hidden_size), np.float32)
    diff = 0.0
    for t in range(len(xs)):
        y, h, c = session.run(None, {"x": xs[t], "h": h, "c": c})
        diff = max(diff, float(np.abs(y - ref[t].numpy()).max()))
    return diff


def evaluate_anomaly(package: Package, samples: int, groups: int, seed: int = FRESH_SEED) -> dict[str, float]:
    """Stream fresh-seed pumps with anomaly episodes through the edge runtime; event-level metrics."""
    model = StreamingAnomalyModel(package, threads=2)
    streams, labels = zip(*(pump_dataset(s, samples, anomaly_rate=0.02) for s in range(seed, seed + groups)))
    t0 = time.perf_counter()
    _, alarms = score_streams(model, list(streams))
    step_ms = 1000 * (time.perf_counter() - t0) / samples
    metrics = event_metrics(np.concatenate(labels), np.concatenate(list(alarms)))
    return {f"fresh_{k}": v for k, v in metrics.items()} | {f"_ms_per_step_batch{groups}": step_ms}


# ---------------------------------------------------------------- driver


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _progress(enabled: bool) -> Progress:
    columns = (TextColumn("{task.description:<28}"), BarColumn(), TextColumn("{task.completed:>5.0f}/{task.total:.0f}"))
    return Progress(*columns, TimeElapsedColumn(), disable=not enabled)


def build_segmentation(out: Path, budget: Budget, seed: int, progress: Progress) -> Package:
    task = progress.add_task("segmentation: train", total=budget.seg_steps)
    t0 = time.perf_counter()
    model = train_segmentation(budget, seed, lambda n: progress.advance(task, n))
    train_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    manifest = seg_manifest(params, conv_flops(model, (1, 1, SEG_H, SEG_W)))
    onnx_bytes = export_segmentation(model)
    package = write_package(out / "seg-synth", manifest, onnx_bytes)
    progress.update(task, description="segmentation: evaluate")
    metrics = {"train_seconds": train_s, "onnx_parity_max_abs_diff": seg_parity(model, package)}
    metrics |= evaluate_segmentation(package, budget.eval_frames)
    return _finish(out / "seg-synth", package, metrics, onnx_bytes)


def build_anomaly(out: Path, budget: Budget, seed: int, progress: Progress) -> Package:
    task = progress.add_task("anomaly: train", total=budget.lstm_steps)
    t0 = time.perf_counter()
    model, mean, std = train_forecaster(budget, seed, lambda n: progress.advance(task, n))
    train_s = time.perf_counter() - t0
    progress.update(task, description="anomaly: calibrate + evaluate")
    post = calibrate(model, mean, std, budget, seed)
    onnx_bytes = export_forecaster(model)
    package = write_package(out / "anomaly-synth", anomaly_manifest(model, mean, std, post), onnx_bytes)
    metrics = {"train_seconds": train_s, "onnx_parity_max_abs_diff": anomaly_parity(model, package)}
    metrics |= evaluate_anomaly(package, budget.eval_pump_samples, budget.eval_pump_groups)
    return _finish(out / "anomaly-synth", package, metrics, onnx_bytes)


def _finish(folder: Path, package: Package, metrics: dict[str, float], onnx_bytes: bytes) -> Package:
    """Rewrite the manifest with eval metrics (keys starting with '_' are bench timings)."""
    bench = {k[1:]: v for k, v in metrics.items() if k.startswith("_")} | {"threads": 2.0}
    quality = package.manifest.metrics | {k: v for k, v in metrics.items() if not k.startswith("_")}
    manifest = package.manifest.model_copy(update={"metrics": quality, "bench": bench})
    return write_package(folder, manifest, onnx_bytes)


def train_all(
    out_dir: str | Path = "models/packages", seed: int = 0, budget: Budget | None = None, progress: bool = True
) -> dict[str, Package]:
    """Train, export, verify and evaluate both quickstart models; returns the written packages."""
    torch.set_num_threads(2)
    out, budget = Path(out_dir), budget or Budget()
    with _progress(progress) as bar:
        packages = {
            "seg-synth": build_segmentation(out, budget, seed, bar),
            "anomaly-synth": build_anomaly(out, budget, seed, bar),
        }
    return packages


def main(out: Path = Path("models/packages"), seed: int = 0) -> None:
    t0 = time.perf_counter()
    packages = train_all(out, seed)
    for package in packages.values():
        shown = {k: float(f"{v:.4g}") for k, v in package.manifest.metrics.items()}
        print(f"{package.ref} -> {package.folder}: {shown}")
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    import typer

    typer.run(main)
