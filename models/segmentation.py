"""``seg-tiles``: a Jetson-sized encoder-decoder for surface defects, trained on magnetic tiles
mixed with synthetic conveyor frames, exported to ONNX and packaged fp32 / int8 / fp16.

- Model: a 4-level U-Net of plain 3x3 conv + BN + ReLU blocks (the safe kind for QDQ int8;
  depthwise convs quantize poorly and gave no int8 speed-up on x86) with a stride-2 stem, so the
  full-resolution work is one cheap conv; bilinear upsampling; a sigmoid probability map out.
- Input: gray, resized to 256x256 exactly as :func:`edge.inference.preprocess_frame` does (the
  training frames are made by that very function), then ``(x/255 - mean) / std``.
- Training: defect-centred random crops with scale, flips, 90-degree rotations and
  brightness/contrast; batches mix defect tiles (oversampled), defect-free tiles and synthetic
  frames; loss = weighted BCE + soft dice. Deterministic split (:mod:`models.tiles`), fixed seeds.

    build_segmentation_packages(Path("models/packages"))  # or: edgeline models train-seg
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from edge.inference import preprocess_frame
from models import tiles
from models.package import (
    Manifest,
    Package,
    SegmentationPostprocess,
    SegmentationPreprocess,
    TensorSpec,
    write_package,
)

log = logging.getLogger(__name__)

NAMES = {"tiles": "seg-tiles", "synthetic": "seg-synth"}
VERSIONS = {"tiles": "1.1.0", "synthetic": "1.0.0"}
MIN_PARITY_AGREEMENT = 0.999


class ParityError(RuntimeError):
    """The exported ONNX model does not reproduce the torch model."""


class SegTrainConfig(BaseModel):
    """Every knob of a seg-tiles build; the defaults train in under 20 minutes on 2 CPU cores."""

    model_config = ConfigDict(extra="forbid")

    dataset: Literal["tiles", "synthetic"] = Field(
        "tiles", description="magnetic tiles (seg-tiles) or synthetic conveyor cameras only (seg-synth, the demo's)")
    seed: int = Field(0, description="seed of torch, numpy sampling and augmentation")
    threads: int = Field(2, ge=1, description="torch intra-op threads")
    device: str = Field("cpu", description="torch device that trains: cpu, cuda, cuda:1 (export is always on cpu)")
    size: int = Field(256, ge=32, description="model input height and width")
    mean: float = Field(0.4, description="input normalisation: (x/255 - mean) / std")
    std: float = Field(0.2, gt=0, description="input normalisation std")
    widths: tuple[int, int, int, int] = Field((16, 32, 64, 96), description="channels per U-Net level")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="share of each class held out for validation")
    epochs: int = Field(12, ge=1, description="training epochs")
    steps_per_epoch: int = Field(500, ge=1, description="optimizer steps per epoch")
    batch: int = Field(16, ge=2, description="crops per step")
    crop: int = Field(128, ge=32, description="training crop side, in model-input pixels")
    scale_range: tuple[float, float] = Field((0.75, 1.35), description="random zoom of a crop")
    defect_fraction: float = Field(0.55, ge=0, le=1, description="share of a batch drawn from defect tiles")
    synthetic_fraction: float = Field(
        0.0, ge=0, le=1, description="share of a batch drawn from synthetic frames (measured: 0.2 cost 0.24 val IoU "
        "at 12k steps, so off by default)")
    defect_centred: float = Field(0.7, ge=0, le=1, description="chance a crop of a defect image is centred on a defect")
    brightness: float = Field(0.25, ge=0, description="max additive brightness shift, in normalised units")
    contrast: float = Field(0.25, ge=0, description="max relative contrast change")
    synthetic_cameras: int = Field(4, ge=0, description="synthetic training cameras (seeds 0..n-1)")
    synthetic_frames: int = Field(60, ge=0, description="frames per synthetic training camera")
    lr: float = Field(5e-4, gt=0, description="peak learning rate (warm-up + cosine)")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    pos_weight: float = Field(1.0, gt=0, description="BCE weight of defect pixels")
    dice_weight: float = Field(1.0, ge=0, description="weight of the soft-dice term")
    max_train_seconds: float = Field(1140.0, gt=0, description="training wall-clock budget; the LR schedule is compressed to fit it")
    threshold: float = Field(0.5, gt=0, lt=1, description="pixel probability threshold in the package")
    min_area: int = Field(12, ge=0, description="smallest region the edge reports, frame pixels")
    max_false_alarms: float = Field(0.05, ge=0, le=1, description="image false-alarm budget on train Free images")
    max_iou_drop: float = Field(0.01, ge=0, description="quantization gate: largest val IoU drop vs fp32")
    calib_frames: int = Field(64, ge=1, description="train frames used to calibrate int8")
    eval_every: int = Field(4, ge=1, description="validate every this many epochs (and after the last)")


PRESETS: dict[str, dict] = {
    # 6k steps of 16 crops: ~18 min on 2 CPU cores (~0.17 s a step)
    "default": {},
    # 12k steps at lr 1e-3: the shipped packages (trained on one GPU, --device cuda, capped at
    # 340 s: 11.6k steps); ~35 min on 2 CPU cores
    "quality": {"epochs": 10, "steps_per_epoch": 1200, "lr": 1e-3, "max_train_seconds": 4 * 3600.0},
    # seg-synth, the demo cameras' model: small (0.06 GFLOP at 128x128), ~3 min on 2 CPU cores
    "synthetic": {"dataset": "synthetic", "size": 128, "widths": (8, 16, 24, 32), "crop": 64, "epochs": 12,
                  "steps_per_epoch": 250, "lr": 2e-3, "synthetic_cameras": 8, "eval_every": 2,
                  "max_train_seconds": 600.0},
}


SMOKE_CONFIG = SegTrainConfig(
    epochs=2, steps_per_epoch=3, batch=4, crop=64, synthetic_fraction=0.2, synthetic_cameras=1, synthetic_frames=6,
    calib_frames=8, eval_every=1,
)


def preset(name: str, **updates) -> SegTrainConfig:
    """A named training preset (``default`` or ``quality``) with ``updates`` on top."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return SegTrainConfig(**(PRESETS[name] | updates))


# ---------------------------------------------------------------- model


def conv_block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class TileUNet(nn.Module):
    """Stride-2 stem, three poolings, decoder with skip connections, output upsampled to input size."""

    def __init__(self, widths: tuple[int, int, int, int] = (16, 32, 64, 96)) -> None:
        super().__init__()
        a, b, c, d = widths
        self.enc1 = conv_block(1, a, stride=2)
        self.enc2, self.enc3, self.enc4 = conv_block(a, b), conv_block(b, c), conv_block(c, d)
        self.dec3, self.dec2, self.dec1 = conv_block(d + c, c), conv_block(c + b, b), conv_block(b + a, a)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.head = nn.Conv2d(a, 1, 1)
        nn.init.constant_(self.head.bias, -4.0)  # prior: defects are rare (p ~ 2%), not a coin flip

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        e4 = self.enc4(self.pool(e3))
        d3 = self.dec3(torch.cat([self.up(e4), e3], 1))
        d2 = self.dec2(torch.cat([self.up(d3), e2], 1))
        d1 = self.dec1(torch.cat([self.up(d2), e1], 1))
        return self.up(self.head(d1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv_flops(model: nn.Module, shape: tuple[int, ...]) -> float:
    """2 x multiply-adds of every conv for one input of ``shape`` (BN folds away at export)."""
    total = 0.0

    def hook(module: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total += 2.0 * k * out.numel() / out.shape[0]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(shape))
    model.train(was_training)
    for handle in handles:
        handle.remove()
    return total


# ---------------------------------------------------------------- data


def preprocess_spec(config: SegTrainConfig) -> SegmentationPreprocess:
    return SegmentationPreprocess(height=config.size, width=config.size, grayscale=True, scale=1 / 255,
                                  mean=config.mean, std=config.std)


def _target(mask: np.ndarray, size: int) -> np.ndarray:
    """Soft defect target at model size: the share of each model pixel covered by defect."""
    return cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)


class FrameSet:
    """Frames already preprocessed to the model input (float16 [N,h,w]) with soft targets."""

    def __init__(self, x: np.ndarray, y: np.ndarray, classes: list[str]) -> None:
        self.x, self.y, self.classes = x, y, classes
        self.defect_ids = np.array([i for i, c in enumerate(classes) if c != tiles.FREE and y[i].max() > 0], int)
        self.free_ids = np.array([i for i, c in enumerate(classes) if c == tiles.FREE], int)

    def __len__(self) -> int:
        return len(self.x)

    @classmethod
    def from_images(cls, images, masks, classes: list[str], spec: SegmentationPreprocess) -> FrameSet:
        x = np.stack([preprocess_frame(im, spec)[0] for im in images]).astype(np.float16)
        y = np.stack([_target(m, spec.height) for m in masks]).astype(np.float16)
        return cls(x, y, list(classes))

    @classmethod
    def from_set(cls, images: tiles.ImageSet, spec: SegmentationPreprocess) -> FrameSet:
        return cls.from_images(images.images, images.masks, images.classes, spec)


def synthetic_train_set(config: SegTrainConfig, spec: SegmentationPreprocess) -> FrameSet:
    """Synthetic conveyor frames of training cameras (seeds below the eval seeds), mixed into
    tile batches at ``synthetic_fraction``."""
    if not config.synthetic_fraction or config.dataset == "synthetic":
        return FrameSet(np.zeros((0, spec.height, spec.width), np.float16),
                        np.zeros((0, spec.height, spec.width), np.float16), [])
    train, _ = tiles.load_dataset("synthetic", synthetic_cameras=config.synthetic_cameras,
                                  synthetic_frames=config.synthetic_frames)
    return FrameSet.from_set(train, spec)


class Sampler:
    """Augmented training batches: mixed sources, defect-centred zoomed crops, flips, rotations,
    brightness/contrast. Deterministic for a given numpy generator."""

    def __init__(self, tiles_set: FrameSet, synth: FrameSet, config: SegTrainConfig, rng: np.random.Generator):
        self.tiles, self.synth, self.config, self.rng = tiles_set, synth, config, rng

    def _pick(self) -> tuple[FrameSet, int]:
        c, r = self.config, self.rng.random()
        if r < c.synthetic_fraction and len(self.synth):
            return self.synth, int(self.rng.integers(len(self.synth)))
        r = self.rng.random()
        if r < c.defect_fraction / max(1e-9, 1 - c.synthetic_fraction) and len(self.tiles.defect_ids):
            return self.tiles, int(self.rng.choice(self.tiles.defect_ids))
        if len(self.tiles.free_ids):
            return self.tiles, int(self.rng.choice(self.tiles.free_ids))
        return self.tiles, int(self.rng.integers(len(self.tiles)))

    def _crop(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, rng = self.config, self.rng
        size = x.shape[0]
        side = int(round(c.crop / rng.uniform(*c.scale_range)))
        side = min(side, size)
        ys, xs = np.nonzero(y > 0.5)
        if len(ys) and rng.random() < c.defect_centred:
            j = rng.integers(len(ys))
            cy, cx = ys[j] + rng.integers(-side // 3, side // 3 + 1), xs[j] + rng.integers(-side // 3, side // 3 + 1)
        else:
            cy, cx = rng.integers(size), rng.integers(size)
        y0 = int(np.clip(cy - side // 2, 0, size - side))
        x0 = int(np.clip(cx - side // 2, 0, size - side))
        xc = x[y0 : y0 + side, x0 : x0 + side].astype(np.float32)
        yc = y[y0 : y0 + side, x0 : x0 + side].astype(np.float32)
        if side != c.crop:
            xc = cv2.resize(xc, (c.crop, c.crop), interpolation=cv2.INTER_LINEAR)
            yc = cv2.resize(yc, (c.crop, c.crop), interpolation=cv2.INTER_LINEAR)
        return xc, yc

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        c, rng = self.config, self.rng
        xb = np.empty((c.batch, 1, c.crop, c.crop), np.float32)
        yb = np.empty_like(xb)
        for k in range(c.batch):
            source, i = self._pick()
            xc, yc = self._crop(source.x[i], source.y[i])
            if rng.random() < 0.5:
                xc, yc = xc[:, ::-1], yc[:, ::-1]
            if rng.random() < 0.5:
                xc, yc = xc[::-1], yc[::-1]
            turns = int(rng.integers(4))
            xc, yc = np.rot90(xc, turns), np.rot90(yc, turns)
            gain = 1.0 + rng.uniform(-c.contrast, c.contrast)
            mean = float(xc.mean())
            xb[k, 0] = (xc - mean) * gain + mean + rng.uniform(-c.brightness, c.brightness)
            yb[k, 0] = yc
        return torch.from_numpy(xb), torch.from_numpy(yb)


# ---------------------------------------------------------------- training


def seg_loss(logits: torch.Tensor, target: torch.Tensor, pos_weight: float, dice_weight: float) -> torch.Tensor:
    """Weighted BCE (defect pixels count ``pos_weight`` times) + soft dice over the batch."""
    weight = torch.tensor(pos_weight, device=logits.device)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)
    prob = torch.sigmoid(logits)
    dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
    return bce + dice_weight * dice


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch: int = 16) -> np.ndarray:
    """Probability maps [N,h,w] for preprocessed inputs [N,h,w]."""
    model.eval()
    device = next(model.parameters()).device
    out = [model(torch.from_numpy(x[i : i + batch].astype(np.float32)[:, None]).to(device)).cpu().numpy()[:, 0]
           for i in range(0, len(x), batch)]
    return np.concatenate(out) if out else np.zeros_like(x, np.float32)


def quick_metrics(prob: np.ndarray, frames: FrameSet, threshold: float) -> dict[str, float]:
    """Pooled IoU and dice at model resolution (the per-epoch view; the package metrics are at
    each image's own size through the edge runtime)."""
    pred, true = prob > threshold, frames.y.astype(np.float32) > 0.5
    inter, union = float((pred & true).sum()), float((pred | true).sum())
    total = float(pred.sum() + true.sum())
    return {"iou": inter / union if union else 1.0, "dice": 2 * inter / total if total else 1.0}


class TrainResult(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: TileUNet
    seconds: float
    steps: int
    history: list[dict[str, float]]


def lr_at(progress: float, peak: float, warmup: float = 0.05) -> float:
    """Linear warm-up then cosine decay to 1% of ``peak`` over progress 0..1."""
    if progress < warmup:
        return peak * (0.1 + 0.9 * progress / warmup)
    t = min(1.0, (progress - warmup) / (1 - warmup))
    return peak * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * t)))


def train(config: SegTrainConfig, train_set: FrameSet, synth: FrameSet, val_set: FrameSet | None = None,
          on_epoch: Callable[[int, dict[str, float]], None] | None = None,
          on_step: Callable[[], None] | None = None) -> TrainResult:
    """AdamW with warm-up + cosine decay. Progress is ``max(steps done / steps planned, seconds
    spent / max_train_seconds)``, so a run on a busy machine still finishes its schedule (fully
    annealed) inside the time budget; on an idle machine the step count rules and the run is
    reproducible step for step."""
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    rng = np.random.default_rng(config.seed)
    model = TileUNet(config.widths).to(config.device, memory_format=torch.channels_last)  # ~20% faster on CPU
    total = config.epochs * config.steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sampler = Sampler(train_set, synth, config, rng)
    history: list[dict[str, float]] = []
    t0, steps, progress = time.perf_counter(), 0, 0.0
    for epoch in range(config.epochs):
        model.train()
        losses = []
        for _ in range(config.steps_per_epoch):
            progress = max(steps / total, (time.perf_counter() - t0) / config.max_train_seconds)
            if progress >= 1.0:
                break
            for group in opt.param_groups:
                group["lr"] = lr_at(progress, config.lr)
            xb, yb = (t.to(config.device, memory_format=torch.channels_last) for t in sampler.batch())
            loss = seg_loss(model.logits(xb), yb, config.pos_weight, config.dice_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            steps += 1
            if on_step:
                on_step()
        progress = max(steps / total, (time.perf_counter() - t0) / config.max_train_seconds)
        last = epoch + 1 == config.epochs or progress >= 1.0
        row = {"epoch": float(epoch + 1), "loss": float(np.mean(losses)) if losses else float("nan"),
               "seconds": time.perf_counter() - t0}
        if val_set is not None and ((epoch + 1) % config.eval_every == 0 or last):
            row |= {f"val_{k}": v for k, v in quick_metrics(predict(model, val_set.x), val_set, config.threshold).items()}
        history.append(row)
        log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in row.items()})
        if on_epoch:
            on_epoch(epoch + 1, row)
        if last:
            if epoch + 1 < config.epochs:
                log.warning("time budget %.0f s reached after %d of %d steps; schedule compressed",
                            config.max_train_seconds, steps, total)
            break
    model = model.cpu().to(memory_format=torch.contiguous_format).eval()
    return TrainResult(model=model, seconds=time.perf_counter() - t0, steps=steps, history=history)


def save_checkpoint(path: Path, config: SegTrainConfig, result: TrainResult) -> None:
    """Weights + the config that made them, so that export and packaging can run elsewhere (train
    on a GPU box, package on the CPU that will be benchmarked)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": config.model_dump(mode="json"), "state_dict": result.model.state_dict(),
                "seconds": result.seconds, "steps": result.steps, "history": result.history}, path)


def load_checkpoint(path: Path) -> tuple[SegTrainConfig, TrainResult]:
    """(the config it was trained with, the trained model on the cpu)."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    config = SegTrainConfig(**data["config"])
    model = TileUNet(config.widths)
    model.load_state_dict(data["state_dict"])
    return config, TrainResult(model=model.eval(), seconds=data["seconds"], steps=data["steps"],
                               history=data["history"])


# ---------------------------------------------------------------- export and packages


def export_onnx(model: TileUNet, size: int) -> bytes:
    """Opset 17, dynamic batch, input ``image`` [batch,1,size,size], output ``prob`` (sigmoid)."""
    buf = io.BytesIO()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(1, 1, size, size),), buf, dynamo=False, opset_version=17,
            input_names=["image"], output_names=["prob"],
            dynamic_axes={"image": {0: "batch"}, "prob": {0: "batch"}},
        )
    return buf.getvalue()


def onnx_parity(model: TileUNet, onnx_bytes: bytes, x: np.ndarray, threshold: float) -> dict[str, float]:
    """Torch vs ONNX Runtime on preprocessed inputs [N,h,w]: max abs diff and threshold agreement."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    ref = predict(model, x)
    got = np.concatenate([session.run(None, {"image": x[i : i + 8].astype(np.float32)[:, None]})[0][:, 0]
                          for i in range(0, len(x), 8)])
    return {"parity_max_abs_diff": float(np.abs(got - ref).max()),
            "parity_pixel_agreement": float(((got > threshold) == (ref > threshold)).mean())}


def make_manifest(config: SegTrainConfig, precision: str = "fp32", metrics: dict[str, float] | None = None,
                  bench: dict[str, float] | None = None) -> Manifest:
    s = config.size
    return Manifest(
        name=NAMES[config.dataset], version=VERSIONS[config.dataset], task="segmentation",
        inputs=[TensorSpec(name="image", shape=["batch", 1, s, s])],
        outputs=[TensorSpec(name="prob", shape=["batch", 1, s, s])],
        preprocess=preprocess_spec(config),
        postprocess=SegmentationPostprocess(classes=["background", "defect"], threshold=config.threshold,
                                            min_area=config.min_area),
        precision=precision, metrics=metrics or {}, bench=bench or {},
    )


def _progress(enabled: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:>5.0f}/{task.total:.0f}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    disable=not enabled)


def train_fp32_package(out_dir: Path, config: SegTrainConfig, progress: bool = True, root: Path | None = None,
                       checkpoint: Path | None = None,
                       save_to: Path | None = None) -> tuple[Package, TileUNet, tuple[tiles.ImageSet, tiles.ImageSet]]:
    """Load the dataset, train (or take the weights of ``checkpoint``), export, check parity,
    evaluate through the edge runtime, and write ``<out_dir>/<name>-fp32``; returns the package,
    the model and the (train, val) sets. With a checkpoint, its own config decides the model and
    preprocessing; ``config`` the threads."""
    torch.set_num_threads(config.threads)
    if checkpoint is not None:
        trained_config, result = load_checkpoint(checkpoint)
        config = trained_config.model_copy(update={"threads": config.threads})
        log.info("weights from %s (%d steps on %s)", checkpoint, result.steps, trained_config.device)
    spec = preprocess_spec(config)
    t_data = time.perf_counter()
    train_images, val_images = tiles.load_dataset(config.dataset, config.val_fraction, root, config.synthetic_cameras,
                                                  config.synthetic_frames)
    train_set, val_set = FrameSet.from_set(train_images, spec), FrameSet.from_set(val_images, spec)
    log.info("data: %d train, %d val frames in %.1f s", len(train_set), len(val_set), time.perf_counter() - t_data)
    if checkpoint is None:
        result = _train_with_progress(config, train_set, val_set, progress)
        if save_to is not None:
            save_checkpoint(save_to, config, result)
    package = _export_and_package(out_dir, config, result, train_images, val_images, val_set)
    return package, result.model, (train_images, val_images)


def _train_with_progress(config: SegTrainConfig, train_set: FrameSet, val_set: FrameSet,
                         progress: bool) -> TrainResult:
    synth = synthetic_train_set(config, preprocess_spec(config))
    total = config.epochs * config.steps_per_epoch
    with _progress(progress) as bar:
        task = bar.add_task(f"{NAMES[config.dataset]}: train", total=total, info="")

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            shown = " ".join(f"{k}={v:.3f}" for k, v in row.items() if k not in ("epoch", "seconds"))
            bar.update(task, info=f"epoch {epoch}/{config.epochs} {shown}")

        return train(config, train_set, synth, val_set, on_epoch, lambda: bar.advance(task))


def _export_and_package(out_dir: Path, config: SegTrainConfig, result: TrainResult, train_images: tiles.ImageSet,
                        val_images: tiles.ImageSet, val_set: FrameSet) -> Package:
    from models.quantize import latency_ms

    model = result.model
    onnx_bytes = export_onnx(model, config.size)
    metrics = {"params": float(count_params(model)),
               "gflops": conv_flops(model, (1, 1, config.size, config.size)) / 1e9,
               "train_seconds": result.seconds, "train_steps": float(result.steps),
               "train_on_gpu": float(config.device != "cpu"),
               "train_seed": float(config.seed)}
    metrics |= onnx_parity(model, onnx_bytes, val_set.x, config.threshold)
    if metrics["parity_pixel_agreement"] < MIN_PARITY_AGREEMENT:
        raise ParityError(f"ONNX export disagrees with torch on {1 - metrics['parity_pixel_agreement']:.4%} of val "
                          f"pixels (max abs diff {metrics['parity_max_abs_diff']:.2e}); allowed "
                          f"{1 - MIN_PARITY_AGREEMENT:.2%}")
    folder = out_dir / f"{NAMES[config.dataset]}-fp32"
    package = write_package(folder, make_manifest(config, "fp32", metrics), onnx_bytes)
    metrics |= tiles.evaluate_package(package, train_images, val_images, config.threads, config.max_false_alarms,
                                      with_synthetic=config.dataset != "synthetic")
    bench = {f"ms_per_frame_batch{b}": latency_ms(onnx_bytes, config.size, b, config.threads) for b in (1, 4)}
    bench["threads"] = float(config.threads)
    package = write_package(folder, tiles.with_alarm(make_manifest(config, "fp32", metrics, bench), metrics),
                            onnx_bytes)
    return package


def build_segmentation_packages(out_dir: Path, config: SegTrainConfig | None = None, progress: bool = True,
                                root: Path | None = None, checkpoint: Path | None = None,
                                save_to: Path | None = None) -> dict[str, Package]:
    """Train + export fp32, then int8 (only if it passes the IoU gate) and fp16; unsigned packages
    ``<name>-fp32``, ``<name>-int8``, ``<name>-fp16`` under ``out_dir`` (name: seg-tiles or seg-synth). Raises
    :class:`models.quantize.QualityGateError` (after writing fp32, before any int8) when the int8
    model loses more than ``config.max_iou_drop`` of val IoU. ``checkpoint``: package these
    weights instead of training; ``save_to``: keep the trained weights there."""
    from models.quantize import quantize_packages

    config = config or SegTrainConfig()
    out_dir = Path(out_dir)
    fp32, _, data = train_fp32_package(out_dir, config, progress, root, checkpoint, save_to)
    packages = {"fp32": fp32}
    packages |= quantize_packages(fp32, out_dir, max_iou_drop=config.max_iou_drop, calib_frames=config.calib_frames,
                                  threads=config.threads, max_false_alarms=config.max_false_alarms, seed=config.seed,
                                  fp32_metrics=fp32.manifest.metrics, data=data)
    return packages
