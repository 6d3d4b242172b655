"""``seg-tiles``: a Jetson-sized encoder-decoder for surface defects, trained on magnetic tiles
mixed with synthetic conveyor frames, exported to ONNX and packaged fp32 / int8 / fp16.

- Model: a 4-level U-Net of plain 3x3 conv + BN + ReLU blocks (the safe kind for QDQ int8;
  depthwise convs quantize poorly and gave no int8 speed-up on x86) with a stride-2 stem, so the
  full-resolution work is one cheap conv; bilinear upsampling; a sigmoid probability map out.
- Input: gray, resized to 256x256 exactly as :func:`models.package.preprocess.preprocess_frame` does (the
  training frames are made by that very function), then ``(x/255 - mean) / std``.
- Training: defect-centred random crops with scale, flips, 90-degree rotations and
  brightness/contrast; batches mix defect tiles (oversampled), defect-free tiles and synthetic
  frames; loss = weighted BCE + soft dice. Deterministic split (:mod:`models.tiles`), fixed seeds.

    build_segmentation_packages(Path("models/packages"))  # or: edgeline models train-seg
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from models import tiles
from models.package import (
    Manifest,
    Package,
    SegmentationPostprocess,
    SegmentationPreprocess,
    TensorSpec,
    pad_input,
    padded_size,
    preprocess_frame,
    write_package,
)

log = logging.getLogger(__name__)

NAMES = {"tiles": "seg-tiles", "synthetic": "seg-synth"}
VERSIONS = {"tiles": "1.2.0", "synthetic": "1.0.0"}
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
    size: int = Field(256, ge=32, description="fixed: model input height and width")
    resize: Literal["fixed", "native"] = Field(
        "fixed", description="fixed: frames resized to size x size; native: each frame at its own size (aspect kept)")
    reference: tuple[int, int] = Field((325, 270), description="native: the reference frame (h, w) of the manifest, "
                                       "the self-test and GFLOP figures (the median magnetic tile)")
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
    sampling: Literal["mixed", "class_balanced"] = Field(
        "mixed", description="mixed: defect images drawn uniformly; class_balanced: a defect class first (each as "
        "often), then one of its images")
    hard_negatives: float = Field(0.0, ge=0, le=1, description="share of defect-free crops centred on the spot the "
                                  "model currently finds most defect-like (mined every ``mine_every`` steps)")
    mine_every: int = Field(250, ge=1, description="steps between two hard-negative minings")
    mine_images: int = Field(48, ge=1, description="defect-free images scored per mining")
    loss: Literal["bce_dice", "focal_tversky"] = Field(
        "bce_dice", description="bce_dice: weighted BCE + soft dice; focal_tversky: focal BCE + Tversky (misses "
        "weigh more than false pixels: made for small structures)")
    focal_gamma: float = Field(2.0, ge=0, description="focal loss exponent")
    tversky_alpha: float = Field(0.3, ge=0, le=1, description="Tversky weight of false-positive pixels (beta = 1 - alpha)")
    blur: float = Field(0.0, ge=0, le=1, description="chance of a Gaussian blur (sigma 0.3-1.2 px) on a crop")
    noise: float = Field(0.0, ge=0, description="max std of additive Gaussian noise, in normalised units")
    gamma: float = Field(0.0, ge=0, lt=1, description="max deviation of a random gamma from 1")
    distill_weight: float = Field(0.0, ge=0, description="weight of the teacher term (MSE between probability maps)")
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
    checkpoint_every_s: float = Field(300.0, gt=0, description="seconds between two resumable checkpoints")
    max_side: int | None = Field(640, gt=0, description="native: frames with a longer side are downscaled to it "
                                 "(a 1080p camera would cost 24 median tiles)")
    cv_recipe: str | None = Field(
        None, description="the models.seg_cv recipe this build ships: train on every shared tile but the "
        "calibration share of defect-free ones, set the image alarm on those with the rule cross-validation "
        "chose, and record the cross-validated figures (None: the older train/val split)")


SHIPPED_RECIPE = "fixed256"
"""The models.seg_cv recipe cross-validation chose (README: the recipes' table). Native resolution
(``baseline``) scored 0.141±0.030 defect IoU against this one's 0.149±0.031 on the same folds and
budget, and 0.154 against 0.230 image recall: it did not pay there, so the shipped net still
resizes to 256x256 (the edge runs native packages all the same)."""


def _shipped_preset() -> dict:
    from models import seg_cv

    return seg_cv.RECIPES[SHIPPED_RECIPE] | {"cv_recipe": SHIPPED_RECIPE, "epochs": 10, "steps_per_epoch": 1200,
                                             "batch": 16, "lr": 1e-3, "max_train_seconds": 4 * 3600.0}


PRESETS: dict[str, dict] = {
    # the shipped seg-tiles: the cross-validated recipe, 12k steps of 16 crops on every shared tile
    # but the calibration share (~25 min on 2 CPU cores, ~5 on a GPU)
    "default": _shipped_preset(),
    # the previous seg-tiles (1.1.0): every tile resized to 256x256, a fixed train/val split
    "fixed256": {"epochs": 10, "steps_per_epoch": 1200, "lr": 1e-3, "max_train_seconds": 4 * 3600.0},
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
    """A named training preset (``default``, ``fixed256`` or ``synthetic``) with ``updates`` on top."""
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
    if config.resize == "native":
        height, width = config.reference
        return SegmentationPreprocess(height=height, width=width, grayscale=True, scale=1 / 255, mean=config.mean,
                                      std=config.std, resize="native", pad_multiple=STRIDE, max_side=config.max_side)
    return SegmentationPreprocess(height=config.size, width=config.size, grayscale=True, scale=1 / 255,
                                  mean=config.mean, std=config.std)


STRIDE = 16
"""Total stride of :class:`TileUNet` (stem and three poolings): native inputs are padded to it."""


def _target(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Defect target at the model input's ``shape``: the share of each input pixel covered by defect
    (the mask itself at native resolution)."""
    if mask.shape == shape:
        return mask.astype(np.float16)
    return cv2.resize(mask.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_AREA).astype(np.float16)


class FrameSet:
    """Frames preprocessed to the model input (float16 [h,w] each: one size when ``fixed``, the
    frame's own when ``native``) with their targets, and the indexes the sampler draws from."""

    def __init__(self, x: list[np.ndarray], y: list[np.ndarray], classes: list[str]) -> None:
        self.x, self.y, self.classes = list(x), list(y), list(classes)
        self.defect_ids = np.array([i for i, c in enumerate(classes) if c != tiles.FREE and y[i].max() > 0], int)
        self.free_ids = np.array([i for i, c in enumerate(classes) if c == tiles.FREE], int)
        self.by_class = {c: np.array([i for i in self.defect_ids if classes[i] == c], int)
                         for c in sorted({classes[i] for i in self.defect_ids})}
        self._defect_points: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.x)

    def defect_points(self, index: int) -> np.ndarray:
        """(row, col) of every defect pixel of frame ``index`` (cached: crops are centred on them)."""
        if index not in self._defect_points:
            self._defect_points[index] = np.argwhere(self.y[index] > 0.5)
        return self._defect_points[index]

    @classmethod
    def from_images(cls, images, masks, classes: list[str], spec: SegmentationPreprocess) -> FrameSet:
        x = [preprocess_frame(im, spec)[0].astype(np.float16) for im in images]
        y = [_target(m, xi.shape) for m, xi in zip(masks, x)]
        return cls(x, y, list(classes))

    @classmethod
    def from_set(cls, images: tiles.ImageSet, spec: SegmentationPreprocess) -> FrameSet:
        return cls.from_images(images.images, images.masks, images.classes, spec)


def synthetic_train_set(config: SegTrainConfig, spec: SegmentationPreprocess) -> FrameSet:
    """Synthetic conveyor frames of training cameras (seeds below the eval seeds), mixed into
    tile batches at ``synthetic_fraction``."""
    if not config.synthetic_fraction or config.dataset == "synthetic":
        return FrameSet([], [], [])
    train, _ = tiles.load_dataset("synthetic", synthetic_cameras=config.synthetic_cameras,
                                  synthetic_frames=config.synthetic_frames)
    return FrameSet.from_set(train, spec)


Spot = tuple[int, int, int]
"""(frame index, row, col) of a hard negative: where a defect-free frame looks most like a defect."""


class Sampler:
    """Augmented training batches: mixed sources, defect-centred zoomed crops (classes balanced if
    asked), hard negatives, flips, rotations, brightness/contrast, gamma, blur and noise.
    Deterministic for a given numpy generator and ``hard`` list."""

    def __init__(self, tiles_set: FrameSet, synth: FrameSet, config: SegTrainConfig, rng: np.random.Generator):
        self.tiles, self.synth, self.config, self.rng = tiles_set, synth, config, rng
        self.hard: list[Spot] = []

    def _pick(self) -> tuple[FrameSet, int, tuple[int, int] | None]:
        """(source, frame index, the spot to centre the crop on or None)."""
        c, r = self.config, self.rng.random()
        if r < c.synthetic_fraction and len(self.synth):
            return self.synth, int(self.rng.integers(len(self.synth))), None
        r = self.rng.random()
        if r < c.defect_fraction / max(1e-9, 1 - c.synthetic_fraction) and len(self.tiles.defect_ids):
            return self.tiles, self._defect_frame(), None
        if self.hard and self.rng.random() < c.hard_negatives:
            i, row, col = self.hard[int(self.rng.integers(len(self.hard)))]
            return self.tiles, i, (row, col)
        if len(self.tiles.free_ids):
            return self.tiles, int(self.rng.choice(self.tiles.free_ids)), None
        return self.tiles, int(self.rng.integers(len(self.tiles))), None

    def _defect_frame(self) -> int:
        if self.config.sampling == "class_balanced":
            members = self.tiles.by_class[list(self.tiles.by_class)[int(self.rng.integers(len(self.tiles.by_class)))]]
            return int(self.rng.choice(members))
        return int(self.rng.choice(self.tiles.defect_ids))

    def _centre(self, source: FrameSet, i: int, spot: tuple[int, int] | None, side: int) -> tuple[int, int]:
        h, w = source.x[i].shape
        if spot is None:
            points = source.defect_points(i)
            if len(points) and self.rng.random() < self.config.defect_centred:
                spot = tuple(points[self.rng.integers(len(points))])
        if spot is None:
            return int(self.rng.integers(h)), int(self.rng.integers(w))
        jitter = side // 3
        return (int(spot[0] + self.rng.integers(-jitter, jitter + 1)),
                int(spot[1] + self.rng.integers(-jitter, jitter + 1)))

    def _crop(self, source: FrameSet, i: int, spot: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
        c = self.config
        x, y = source.x[i], source.y[i]
        side = int(round(c.crop / self.rng.uniform(*c.scale_range)))
        cy, cx = self._centre(source, i, spot, side)
        sh, sw = min(side, x.shape[0]), min(side, x.shape[1])
        y0 = int(np.clip(cy - sh // 2, 0, x.shape[0] - sh))
        x0 = int(np.clip(cx - sw // 2, 0, x.shape[1] - sw))
        xc = x[y0 : y0 + sh, x0 : x0 + sw].astype(np.float32)
        yc = y[y0 : y0 + sh, x0 : x0 + sw].astype(np.float32)
        if (sh, sw) != (side, side):  # a frame narrower than the crop: mirror it out to a square
            pads = ((0, side - sh), (0, side - sw))
            xc, yc = np.pad(xc, pads, mode="symmetric"), np.pad(yc, pads, mode="symmetric")
        if side != c.crop:
            xc = cv2.resize(xc, (c.crop, c.crop), interpolation=cv2.INTER_LINEAR)
            yc = cv2.resize(yc, (c.crop, c.crop), interpolation=cv2.INTER_LINEAR)
        return xc, yc

    def _photometric(self, xc: np.ndarray) -> np.ndarray:
        """Brightness/contrast, then (if configured) gamma on the raw [0,1] scale, blur and sensor noise."""
        c, rng = self.config, self.rng
        gain = 1.0 + rng.uniform(-c.contrast, c.contrast)
        mean = float(xc.mean())
        xc = (xc - mean) * gain + mean + rng.uniform(-c.brightness, c.brightness)
        if c.gamma:
            raw = np.clip(xc * c.std + c.mean, 0.0, 1.0) ** (1.0 + rng.uniform(-c.gamma, c.gamma))
            xc = (raw - c.mean) / c.std
        if c.blur and rng.random() < c.blur:
            xc = cv2.GaussianBlur(np.ascontiguousarray(xc, np.float32), (0, 0), rng.uniform(0.3, 1.2))
        if c.noise:
            xc = xc + rng.normal(0.0, rng.uniform(0.0, c.noise), xc.shape)
        return xc

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        c, rng = self.config, self.rng
        xb = np.empty((c.batch, 1, c.crop, c.crop), np.float32)
        yb = np.empty_like(xb)
        for k in range(c.batch):
            source, i, spot = self._pick()
            xc, yc = self._crop(source, i, spot)
            if rng.random() < 0.5:
                xc, yc = xc[:, ::-1], yc[:, ::-1]
            if rng.random() < 0.5:
                xc, yc = xc[::-1], yc[::-1]
            turns = int(rng.integers(4))
            xc, yc = np.rot90(xc, turns), np.rot90(yc, turns)
            xb[k, 0] = self._photometric(xc)
            yb[k, 0] = yc
        return torch.from_numpy(xb), torch.from_numpy(yb)


# ---------------------------------------------------------------- training


def seg_loss(logits: torch.Tensor, target: torch.Tensor, config: SegTrainConfig) -> torch.Tensor:
    """``bce_dice``: weighted BCE (defect pixels count ``pos_weight`` times) + soft dice over the
    batch. ``focal_tversky``: focal BCE (easy background pixels fade out) + Tversky, which weighs a
    missed defect pixel ``1 - tversky_alpha`` against ``tversky_alpha`` for a false one."""
    prob = torch.sigmoid(logits)
    if config.loss == "focal_tversky":
        bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p_true = prob * target + (1 - prob) * (1 - target)
        pixel = ((1 - p_true) ** config.focal_gamma * bce).mean()
        tp, fp, fn = (prob * target).sum(), (prob * (1 - target)).sum(), ((1 - prob) * target).sum()
        region = 1 - (tp + 1) / (tp + config.tversky_alpha * fp + (1 - config.tversky_alpha) * fn + 1)
    else:
        weight = torch.tensor(config.pos_weight, device=logits.device)
        pixel = nn.functional.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)
        region = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
    return pixel + config.dice_weight * region


def pad_to_stride(x: np.ndarray) -> np.ndarray:
    """[h,w] -> [H,W], H and W multiples of :data:`STRIDE`, mirrored like the edge runtime pads."""

    return pad_input(x[None], padded_size(x.shape, STRIDE))[0]


@torch.no_grad()
def predict(model: nn.Module, xs: list[np.ndarray], batch: int = 16) -> list[np.ndarray]:
    """Probability maps for preprocessed inputs (each [h,w], any sizes): frames of one padded size
    run together, each map cropped back to its frame."""
    model.eval()
    device = next(model.parameters()).device
    out: list[np.ndarray] = [np.empty(0, np.float32)] * len(xs)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(xs):
        groups.setdefault(pad_to_stride(x).shape, []).append(i)
    for indexes in groups.values():
        for start in range(0, len(indexes), batch):
            chunk = indexes[start : start + batch]
            inputs = np.stack([pad_to_stride(xs[i]) for i in chunk]).astype(np.float32)[:, None]
            probs = model(torch.from_numpy(inputs).to(device)).cpu().numpy()[:, 0]
            for i, prob in zip(chunk, probs):
                out[i] = prob[: xs[i].shape[0], : xs[i].shape[1]]
    return out


def quick_metrics(probs: list[np.ndarray], frames: FrameSet, threshold: float) -> dict[str, float]:
    """Pooled IoU and dice at model resolution over all frames, and pooled IoU over the defect frames
    (the per-epoch view; the package metrics come from the edge runtime at each image's own size)."""
    inter = union = total = inter_defect = union_defect = 0.0
    for prob, target, cls in zip(probs, frames.y, frames.classes):
        pred, true = prob > threshold, target.astype(np.float32) > 0.5
        i, u = float((pred & true).sum()), float((pred | true).sum())
        inter, union, total = inter + i, union + u, total + float(pred.sum() + true.sum())
        if cls != tiles.FREE:
            inter_defect, union_defect = inter_defect + i, union_defect + u
    return {"iou": inter / union if union else 1.0, "dice": 2 * inter / total if total else 1.0,
            "iou_defect_images": inter_defect / union_defect if union_defect else 1.0}


def mine_hard_negatives(model: nn.Module, frames: FrameSet, count: int, rng: np.random.Generator) -> list[Spot]:
    """Score ``count`` random defect-free frames; the more defect-like half, each at its most
    defect-like pixel, become the next hard negatives."""
    if not len(frames.free_ids):
        return []
    picks = rng.choice(frames.free_ids, size=min(count, len(frames.free_ids)), replace=False)
    probs = predict(model, [frames.x[i] for i in picks])
    spots = sorted(((float(p.max()), int(i), *np.unravel_index(int(p.argmax()), p.shape)) for i, p in zip(picks, probs)),
                   reverse=True)
    return [(i, int(row), int(col)) for _, i, row, col in spots[: max(1, len(spots) // 2)]]


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
    return peak * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))


@dataclass
class _Run:
    """Where a training run is: what a resumable checkpoint holds besides weights and optimizer."""

    steps: int = 0
    seconds: float = 0.0
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def train(config: SegTrainConfig, train_set: FrameSet, synth: FrameSet, val_set: FrameSet | None = None,
          on_epoch: Callable[[int, dict[str, float]], None] | None = None,
          on_step: Callable[[], None] | None = None, teacher: nn.Module | None = None,
          initial: TileUNet | None = None, resume_from: Path | None = None) -> TrainResult:
    """AdamW with warm-up + cosine decay. Progress is ``max(steps done / steps planned, seconds
    spent / max_train_seconds)``, so a run on a busy machine still finishes its schedule (fully
    annealed) inside the time budget; on an idle machine the step count rules and the run is
    reproducible step for step.

    ``teacher``: distillation, its probability maps are a second target (``distill_weight``);
    ``initial``: start from these weights (fine-tuning a pruned net); ``resume_from``: a resumable
    checkpoint written there every ``checkpoint_every_s`` and after each epoch, and read back first
    when it exists, so a killed run goes on where it was."""
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    rng = np.random.default_rng(config.seed)
    model = (initial or TileUNet(config.widths)).to(config.device, memory_format=torch.channels_last)
    if teacher is not None:
        teacher = teacher.to(config.device, memory_format=torch.channels_last).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sampler = Sampler(train_set, synth, config, rng)
    run = _Run()
    if resume_from is not None and resume_from.exists():
        run = _resume(resume_from, config, model, opt, rng, sampler)
        log.info("resumed %s at step %d (%.0f s trained)", resume_from, run.steps, run.seconds)
    total = config.epochs * config.steps_per_epoch
    t0 = time.perf_counter() - run.seconds
    saved_at = time.perf_counter()

    def progress() -> float:
        return max(run.steps / total, (time.perf_counter() - t0) / config.max_train_seconds)

    for epoch in range(run.epoch, config.epochs):
        losses = []
        while run.steps < (epoch + 1) * config.steps_per_epoch and progress() < 1.0:
            if config.hard_negatives and run.steps and run.steps % config.mine_every == 0:
                sampler.hard = mine_hard_negatives(model, train_set, config.mine_images, rng)
            model.train()
            losses.append(_step(model, opt, sampler, config, lr_at(progress(), config.lr), teacher))
            run.steps += 1
            if on_step:
                on_step()
            if resume_from is not None and time.perf_counter() - saved_at > config.checkpoint_every_s:
                _save_run(resume_from, config, model, opt, rng, sampler, replace(run, seconds=time.perf_counter() - t0))
                saved_at = time.perf_counter()
        last = epoch + 1 == config.epochs or progress() >= 1.0
        row = {"epoch": float(epoch + 1), "loss": float(np.mean(losses)) if losses else float("nan"),
               "seconds": time.perf_counter() - t0}
        if val_set is not None and ((epoch + 1) % config.eval_every == 0 or last):
            row |= {f"val_{k}": v for k, v in quick_metrics(predict(model, val_set.x), val_set, config.threshold).items()}
        run.history.append(row)
        run.epoch = epoch + 1
        log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in row.items()})
        if resume_from is not None:
            _save_run(resume_from, config, model, opt, rng, sampler, replace(run, seconds=time.perf_counter() - t0))
            saved_at = time.perf_counter()
        if on_epoch:
            on_epoch(epoch + 1, row)
        if last:
            if epoch + 1 < config.epochs:
                log.warning("time budget %.0f s reached after %d of %d steps; schedule compressed",
                            config.max_train_seconds, run.steps, total)
            break
    model = model.cpu().to(memory_format=torch.contiguous_format).eval()
    return TrainResult(model=model, seconds=time.perf_counter() - t0, steps=run.steps, history=run.history)


def _step(model: TileUNet, opt: torch.optim.Optimizer, sampler: Sampler, config: SegTrainConfig, lr: float,
          teacher: nn.Module | None) -> float:
    for group in opt.param_groups:
        group["lr"] = lr
    xb, yb = (t.to(config.device, memory_format=torch.channels_last) for t in sampler.batch())
    logits = model.logits(xb)
    loss = seg_loss(logits, yb, config)
    if teacher is not None and config.distill_weight:
        with torch.no_grad():
            taught = teacher(xb)
        loss = loss + config.distill_weight * nn.functional.mse_loss(torch.sigmoid(logits), taught)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def _save_run(path: Path, config: SegTrainConfig, model: TileUNet, opt: torch.optim.Optimizer,
              rng: np.random.Generator, sampler: Sampler, run: _Run) -> None:
    """A resumable checkpoint, written atomically (a kill mid-write leaves the previous one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"config": config.model_dump(mode="json"), "state_dict": model.state_dict(),
                "optimizer": opt.state_dict(), "rng": rng.bit_generator.state, "hard": sampler.hard,
                "steps": run.steps, "seconds": run.seconds, "epoch": run.epoch, "history": run.history,
                "complete": False}, tmp)
    os.replace(tmp, path)


def _resume(path: Path, config: SegTrainConfig, model: TileUNet, opt: torch.optim.Optimizer,
            rng: np.random.Generator, sampler: Sampler) -> _Run:
    data = torch.load(path, map_location=config.device, weights_only=True)
    if SegTrainConfig(**data["config"]).model_dump(exclude={"threads", "device"}) != config.model_dump(
            exclude={"threads", "device"}):
        raise ValueError(f"{path} was written by another training config; delete it or use the same recipe")
    model.load_state_dict(data["state_dict"])
    opt.load_state_dict(data["optimizer"])
    rng.bit_generator.state = data["rng"]
    sampler.hard = [tuple(spot) for spot in data["hard"]]
    return _Run(data["steps"], data["seconds"], data["epoch"], data["history"])


def save_checkpoint(path: Path, config: SegTrainConfig, result: TrainResult) -> None:
    """Weights + the config that made them, so that export and packaging can run elsewhere (train
    on a GPU box, package on the CPU that will be benchmarked)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": config.model_dump(mode="json"), "state_dict": result.model.state_dict(),
                "seconds": result.seconds, "steps": result.steps, "history": result.history, "complete": True},
               path)


def load_checkpoint(path: Path) -> tuple[SegTrainConfig, TrainResult]:
    """(the config it was trained with, the trained model on the cpu). Refuses a resumable
    checkpoint of a run that has not finished: a half-trained net is never packaged."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not data.get("complete", True):
        raise ValueError(f"{path} is the checkpoint of an unfinished run (step {data['steps']}); resume it first")
    config = SegTrainConfig(**data["config"])
    model = TileUNet(config.widths)
    model.load_state_dict(data["state_dict"])
    return config, TrainResult(model=model.eval(), seconds=data["seconds"], steps=data["steps"],
                               history=data["history"])


# ---------------------------------------------------------------- export and packages


def export_onnx(model: TileUNet, size: int | tuple[int, int], native: bool = False) -> bytes:
    """Opset 17, input ``image`` [batch,1,h,w], output ``prob`` (sigmoid); batch is dynamic, and
    so are height and width when ``native``."""
    height, width = (size, size) if isinstance(size, int) else size
    axes = {0: "batch", 2: "height", 3: "width"} if native else {0: "batch"}
    buf = io.BytesIO()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(1, 1, height, width),), buf, dynamo=False, opset_version=17,
            input_names=["image"], output_names=["prob"], dynamic_axes={"image": axes, "prob": axes},
        )
    return buf.getvalue()


def model_input(config: SegTrainConfig) -> tuple[int, int]:
    """(h, w) the net sees for the reference frame: the padded median tile (native) or size x size."""
    if config.resize == "native":
        return tuple(-(-side // STRIDE) * STRIDE for side in config.reference)
    return config.size, config.size


def export_for(model: TileUNet, config: SegTrainConfig) -> bytes:
    """The graph a package of ``config`` ships: dynamic height/width for a native one."""
    if config.resize == "native":
        return export_onnx(model, model_input(config), native=True)
    return export_onnx(model, config.size)


def onnx_parity(model: TileUNet, onnx_bytes: bytes, xs: list[np.ndarray], threshold: float) -> dict[str, float]:
    """Torch vs ONNX Runtime on preprocessed inputs (each [h,w], padded like the edge pads): max
    abs diff and threshold agreement."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    refs = predict(model, xs)
    diff, agree, pixels = 0.0, 0.0, 0
    for x, ref in zip(xs, refs):
        got = session.run(None, {"image": pad_to_stride(x).astype(np.float32)[None, None]})[0][0, 0]
        got = got[: x.shape[0], : x.shape[1]]
        diff = max(diff, float(np.abs(got - ref).max()))
        agree += float(((got > threshold) == (ref > threshold)).sum())
        pixels += ref.size
    return {"parity_max_abs_diff": diff, "parity_pixel_agreement": agree / pixels if pixels else 1.0}


def make_manifest(config: SegTrainConfig, precision: str = "fp32", metrics: dict[str, float] | None = None,
                  bench: dict[str, float] | None = None) -> Manifest:
    spec = preprocess_spec(config)
    shape: list[int | str] = (["batch", 1, "height", "width"] if config.resize == "native"
                              else ["batch", 1, config.size, config.size])
    return Manifest(
        name=NAMES[config.dataset], version=VERSIONS[config.dataset], task="segmentation",
        inputs=[TensorSpec(name="image", shape=shape)],
        outputs=[TensorSpec(name="prob", shape=shape)],
        preprocess=spec,
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
    if config.cv_recipe is not None:
        return _train_on_shared_tiles(out_dir, config, progress, root, result if checkpoint else None, save_to)
    spec = preprocess_spec(config)
    t_data = time.perf_counter()
    train_images, val_images = tiles.load_dataset(config.dataset, config.val_fraction, root, config.synthetic_cameras,
                                                  config.synthetic_frames)
    train_set, val_set = FrameSet.from_set(train_images, spec), FrameSet.from_set(val_images, spec)
    log.info("data: %d train, %d val frames in %.1f s", len(train_set), len(val_set), time.perf_counter() - t_data)
    if checkpoint is None:
        result = _train_with_progress(config, train_set, val_set, progress, run_file(save_to))
        if save_to is not None:
            save_checkpoint(save_to, config, result)
            run_file(save_to).unlink(missing_ok=True)
    package = _export_and_package(out_dir, config, result, train_images, val_images, val_set)
    return package, result.model, (train_images, val_images)


def run_file(save_to: Path | None) -> Path | None:
    """The resumable checkpoint of a run whose weights go to ``save_to`` (removed once they are there)."""
    return save_to.with_suffix(".run.pt") if save_to is not None else None


def _train_with_progress(config: SegTrainConfig, train_set: FrameSet, val_set: FrameSet | None,
                         progress: bool, resume_from: Path | None = None) -> TrainResult:
    synth = synthetic_train_set(config, preprocess_spec(config))
    total = config.epochs * config.steps_per_epoch
    with _progress(progress) as bar:
        task = bar.add_task(f"{NAMES[config.dataset]}: train", total=total, info="")

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            shown = " ".join(f"{k}={v:.3f}" for k, v in row.items() if k not in ("epoch", "seconds"))
            bar.update(task, completed=min(total, epoch * config.steps_per_epoch),
                       info=f"epoch {epoch}/{config.epochs} {shown}")

        return train(config, train_set, synth, val_set, on_epoch, lambda: bar.advance(task), resume_from=resume_from)


def _train_on_shared_tiles(out_dir: Path, config: SegTrainConfig, progress: bool, root: Path | None,
                           trained: TrainResult | None,
                           save_to: Path | None) -> tuple[Package, TileUNet, tuple[tiles.ImageSet, tiles.ImageSet]]:
    """The shipped build (issue 15's protocol): train on every shared tile but the calibration share
    of defect-free ones; the image alarm is the rule cross-validation chose for ``config.cv_recipe``,
    its threshold set on those calibration tiles at ``max_false_alarms``; the manifest records the
    cross-validated figures, the recipe and the data hash. Returns (package, model, (int8
    calibration tiles, gate tiles)), both drawn from the training tiles (folds 1 and 0): the gate
    tiles serve parity and the int8 drift gate, which compare two graphs on the same images, never
    as a quality figure."""
    from models import seg_cv

    items = tiles.list_items(root)
    train_items, calib_items = seg_cv.split_calibration(items)
    folds = seg_cv.assign_folds(items)
    trained_on = {item.image for item in train_items}
    quant_items, gate_items = ([item for item, fold in zip(items, folds) if fold == k and item.image in trained_on]
                               for k in (1, 0))
    spec = preprocess_spec(config)
    calib_images, gate_images = tiles.ImageSet.from_items(calib_items), tiles.ImageSet.from_items(gate_items)
    if trained is None:
        train_set = FrameSet.from_set(tiles.ImageSet.from_items(train_items), spec)
        log.info("data: %d training tiles, %d calibration tiles", len(train_set), len(calib_items))
        trained = _train_with_progress(config, train_set, None, progress, run_file(save_to))
        if save_to is not None:
            save_checkpoint(save_to, config, trained)
            run_file(save_to).unlink(missing_ok=True)
    summary = seg_cv.recipe_summary(config.cv_recipe)
    if summary["alarm_rule"] is None:
        raise ValueError(f"no cross-validation results for recipe {config.cv_recipe!r} under {seg_cv.RESULTS} "
                         f"(run: python -m models.seg_cv run --recipe {config.cv_recipe})")
    record = {"recipe": config.model_dump(mode="json"), "cv_recipe": config.cv_recipe,
              "data_sha256": seg_cv.dataset_sha256(items), "images": len(items), "trained_on": len(train_items),
              "calibration_tiles": len(calib_items), "fold_seed": seg_cv.FOLD_SEED, "folds": seg_cv.FOLDS,
              "cv": {k: summary[k] for k in ("folds", "steps", "mean", "std", "alarm_rule")}}
    package = _export_shipped(out_dir, config, trained, gate_images, record)
    package = ship_alarm(package, summary["alarm_rule"], calib_images, config.max_false_alarms, config.threads)
    return package, trained.model, (tiles.ImageSet.from_items(quant_items), gate_images)


def cv_metrics(summary: dict) -> dict[str, float]:
    """The cross-validated figures a shipped manifest carries: ``cv_<metric>`` (mean over folds) and
    ``cv_<metric>_std``, for IoU (over defect images, all, per class), dice, and the chosen alarm's
    recall and false alarms."""
    from models import seg_cv

    rule = summary["alarm_rule"]
    keys = seg_cv.HEADLINE + ["iou", f"recall[{rule}]", f"false_alarms[{rule}]"]
    out: dict[str, float] = {}
    for key in keys:
        name = key.replace(f"[{rule}]", "").replace("recall", "image_recall").replace("false_alarms",
                                                                                      "false_alarm_rate")
        out[f"cv_{name}"], out[f"cv_{name}_std"] = summary["mean"][key], summary["std"][key]
    return out


def _export_shipped(out_dir: Path, config: SegTrainConfig, trained: TrainResult, gate_images: tiles.ImageSet,
                    record: dict) -> Package:
    from models.quantize import latency_ms

    model = trained.model
    onnx_bytes = export_for(model, config)
    metrics = {"params": float(count_params(model)), "gflops": conv_flops(model, (1, 1, *model_input(config))) / 1e9,
               "train_seconds": trained.seconds, "train_steps": float(trained.steps),
               "train_on_gpu": float(config.device != "cpu"), "train_seed": float(config.seed)}
    gate_frames = FrameSet.from_set(gate_images, preprocess_spec(config))
    metrics |= onnx_parity(model, onnx_bytes, gate_frames.x, config.threshold)
    if metrics["parity_pixel_agreement"] < MIN_PARITY_AGREEMENT:
        raise ParityError(f"ONNX export disagrees with torch on {1 - metrics['parity_pixel_agreement']:.4%} of "
                          f"pixels (max abs diff {metrics['parity_max_abs_diff']:.2e}); allowed "
                          f"{1 - MIN_PARITY_AGREEMENT:.2%}")
    metrics |= cv_metrics(record["cv"])
    bench = {f"ms_per_frame_batch{b}": latency_ms(onnx_bytes, model_input(config), b, config.threads) for b in (1, 4)}
    bench["threads"] = float(config.threads)
    manifest = make_manifest(config, "fp32", metrics, bench).model_copy(update={"training": record})
    return write_package(out_dir / f"{NAMES[config.dataset]}-fp32", manifest, onnx_bytes)


def ship_alarm(package: Package, rule: str, calib_images: tiles.ImageSet, max_false_alarms: float,
               threads: int) -> Package:
    """``package`` rewritten with the image alarm ``rule`` at the threshold that keeps its own
    scores of the calibration tiles (defect-free, never trained on) within ``max_false_alarms``.
    Each precision gets its own threshold: int8 probabilities differ slightly from fp32's."""
    from models.package import SegmentationModel
    from models import seg_cv

    scores = tiles.score_set(SegmentationModel(package, threads=threads), calib_images)
    alarm = seg_cv.calibrated_alarm(rule, scores, max_false_alarms)
    metrics = package.manifest.metrics | alarm.metrics() | {"alarm_max_false_alarms": max_false_alarms}
    manifest = tiles.with_alarm(package.manifest.model_copy(update={"metrics": metrics}), alarm.metrics())
    log.info("%s: image alarm %s (set on %d calibration tiles)", package.manifest.package_id, alarm.describe(),
             len(scores))
    return write_package(package.folder, manifest, package.model_path.read_bytes())


def _export_and_package(out_dir: Path, config: SegTrainConfig, result: TrainResult, train_images: tiles.ImageSet,
                        val_images: tiles.ImageSet, val_set: FrameSet) -> Package:
    from models.quantize import latency_ms

    model = result.model
    onnx_bytes = export_for(model, config)
    metrics = {"params": float(count_params(model)),
               "gflops": conv_flops(model, (1, 1, *model_input(config))) / 1e9,
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
    bench = {f"ms_per_frame_batch{b}": latency_ms(onnx_bytes, model_input(config), b, config.threads) for b in (1, 4)}
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
    config = config if checkpoint is None else load_checkpoint(checkpoint)[0].model_copy(
        update={"threads": config.threads})
    packages = {"fp32": fp32}
    shipped = config.cv_recipe is not None
    packages |= quantize_packages(fp32, out_dir, max_iou_drop=config.max_iou_drop, calib_frames=config.calib_frames,
                                  threads=config.threads, max_false_alarms=config.max_false_alarms, seed=config.seed,
                                  fp32_metrics=None if shipped else fp32.manifest.metrics, data=data)
    if shipped:
        from models import seg_cv

        calib = tiles.ImageSet.from_items(seg_cv.split_calibration(tiles.list_items(root))[1])
        packages |= {precision: _ship_quantized(packages[precision], fp32, calib, config)
                     for precision in packages if precision != "fp32"}
    return packages


GATE_RENAMED = {"iou": "gate_iou", "iou_defect_images": "gate_iou_defect_images", "fp32_iou": "gate_fp32_iou"}
SEEN_QUALITY = ("iou", "dice", "ap_", "image_", "false_alarm", "val_images", "alarm_", "area_threshold", "synthetic_")


def _ship_quantized(package: Package, fp32: Package, calib_images: tiles.ImageSet, config: SegTrainConfig) -> Package:
    """An int8/fp16 package of the shipped build: the quantization gate's figures (measured on tiles
    the net was trained on, so they compare graphs, not quality) renamed ``gate_*``, the other
    quality figures of those tiles dropped, fp32's cross-validated figures and training record, and
    its own alarm threshold on the calibration tiles (fp16 takes fp32's where the CPU cannot run it)."""
    own = package.manifest.metrics
    kept = {GATE_RENAMED.get(k, k): v for k, v in own.items()
            if k in GATE_RENAMED or k == "iou_drop_vs_fp32" or not k.startswith(SEEN_QUALITY)}
    cv = {k: v for k, v in fp32.manifest.metrics.items() if k.startswith("cv_")}
    manifest = package.manifest.model_copy(update={"metrics": kept | cv, "training": fp32.manifest.training})
    if package.manifest.precision == "fp16" and not own.get("cpu_runs"):
        manifest = manifest.model_copy(update={"postprocess": fp32.manifest.postprocess})
        return write_package(package.folder, manifest, package.model_path.read_bytes())
    package = write_package(package.folder, manifest, package.model_path.read_bytes())
    return ship_alarm(package, fp32.manifest.training["cv"]["alarm_rule"], calib_images, config.max_false_alarms,
                      config.threads)
