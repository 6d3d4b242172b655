"""The magnetic-tile surface-defect set: where it lives, how it is split, how it is read.

``MT_<Class>/<id>.jpg`` is a gray image and ``<id>.png`` its mask (threshold >127). The split
into train/val is deterministic and stratified: within each class, a file goes to val when the
sha256 of its name falls in the lowest ``val_fraction`` of the hash space, so adding or removing
files never moves the others. No torch here: the edge-side evaluation (``eval-seg``) uses it.

Data folder: ``$EDGELINE_DATA/magnetic-tile``; default ``<repo>/../shared/data``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

CLASSES = ("Blowhole", "Break", "Crack", "Fray", "Uneven", "Free")
DEFECT_CLASSES = CLASSES[:-1]
FREE = "Free"
REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE = "https://github.com/abin24/Magnetic-tile-defect-datasets (Huang, Qiu, Yuan; The Visual Computer 2020)"


class TilesMissing(FileNotFoundError):
    """The magnetic-tile folder is not where the environment says."""


def data_root() -> Path:
    """``$EDGELINE_DATA`` or ``<repo>/../shared/data``."""
    return Path(os.environ.get("EDGELINE_DATA") or REPO_ROOT.parent / "shared" / "data")


def tiles_dir(root: Path | None = None) -> Path:
    return (root or data_root()) / "magnetic-tile"


def tiles_available(root: Path | None = None) -> bool:
    folder = tiles_dir(root)
    return all((folder / f"MT_{c}").is_dir() for c in CLASSES)


@dataclass(frozen=True)
class TileItem:
    """One image of the set: its class, image path and mask path."""

    cls: str
    image: Path
    mask: Path

    @property
    def defective(self) -> bool:
        return self.cls != FREE

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(gray uint8 image, binary uint8 mask {0,1}) at the file's own size."""
        return read_image(self.image), read_mask(self.mask)


def read_image(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise OSError(f"cannot read image {path}")
    return image


def read_mask(path: Path) -> np.ndarray:
    """The mask binarised at >127 (the files are not strictly binary)."""
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise OSError(f"cannot read mask {path}")
    return binarize_mask(mask)


def binarize_mask(mask: np.ndarray) -> np.ndarray:
    return (mask > 127).astype(np.uint8)


def list_items(root: Path | None = None) -> list[TileItem]:
    """Every image with a mask, sorted by class then name."""
    folder = tiles_dir(root)
    if not tiles_available(root):
        raise TilesMissing(
            f"magnetic-tile data not found under {folder} (set EDGELINE_DATA; source: {SOURCE})"
        )
    items = []
    for cls in CLASSES:
        for image in sorted((folder / f"MT_{cls}").glob("*.jpg")):
            mask = image.with_suffix(".png")
            if mask.is_file():
                items.append(TileItem(cls, image, mask))
    return items


def in_val(name: str, val_fraction: float, salt: str = "") -> bool:
    """Deterministic membership: sha256 of the file name, as a number in [0, 1)."""
    digest = hashlib.sha256(f"{salt}{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def split_items(
    items: list[TileItem], val_fraction: float = 0.2, salt: str = ""
) -> tuple[list[TileItem], list[TileItem]]:
    """(train, val), stratified by class: the hash rule is applied within each class, and a
    class with at least two images always keeps one on each side."""
    train: list[TileItem] = []
    val: list[TileItem] = []
    for cls in CLASSES:
        members = [it for it in items if it.cls == cls]
        chosen = [in_val(it.image.name, val_fraction, salt) for it in members]
        if len(members) >= 2 and not any(chosen):  # tiny class: take the lowest hash
            chosen[min(range(len(members)), key=lambda i: _hash(members[i].image.name, salt))] = True
        if len(members) >= 2 and all(chosen):
            chosen[max(range(len(members)), key=lambda i: _hash(members[i].image.name, salt))] = False
        for item, is_val in zip(members, chosen):
            (val if is_val else train).append(item)
    return train, val


def _hash(name: str, salt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}{name}".encode()).digest()[:8], "big")


def load_split(val_fraction: float = 0.2, root: Path | None = None) -> tuple[list[TileItem], list[TileItem]]:
    return split_items(list_items(root), val_fraction)


SYNTHETIC = "Synthetic"
DATASETS = ("tiles", "synthetic")


@dataclass(frozen=True)
class ImageSet:
    """Gray frames with binary masks; ``classes[i]`` is the defect class, ``FREE`` for a clean frame."""

    images: list[np.ndarray]
    masks: list[np.ndarray]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def from_items(cls, items: list[TileItem]) -> ImageSet:
        loaded = [item.load() for item in items]
        return cls([im for im, _ in loaded], [m for _, m in loaded], [it.cls for it in items])

    @classmethod
    def synthetic(cls, seeds: range, frames: int, defect_rate: float, stride: int) -> ImageSet:
        """Frames of synthetic conveyor cameras ``seeds``; class ``Synthetic`` where a defect shows."""
        from edge.synthetic import make_dataset

        images: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        for seed in seeds:
            ims, ms = make_dataset(seed, frames, defect_rate=defect_rate, stride=stride)
            images += list(ims)
            masks += [(m > 0).astype(np.uint8) for m in ms]
        return cls(images, masks, [SYNTHETIC if m.any() else FREE for m in masks])


def load_dataset(dataset: str = "tiles", val_fraction: float = 0.2, root: Path | None = None,
                 synthetic_cameras: int = 4, synthetic_frames: int = 60) -> tuple[ImageSet, ImageSet]:
    """(train, val): the magnetic-tile split, or synthetic training cameras (seeds below
    ``SYNTH_EVAL_SEED``) against the fresh evaluation cameras."""
    if dataset == "tiles":
        train, val = load_split(val_fraction, root)
        return ImageSet.from_items(train), ImageSet.from_items(val)
    if dataset == "synthetic":
        return (ImageSet.synthetic(range(synthetic_cameras), synthetic_frames, 0.5, 29),
                ImageSet.synthetic(range(SYNTH_EVAL_SEED, SYNTH_EVAL_SEED + SYNTH_EVAL_CAMERAS), SYNTH_EVAL_FRAMES,
                                   0.4, 17))
    raise ValueError(f"unknown dataset {dataset!r} (choose from {', '.join(DATASETS)})")


# ---------------------------------------------------------------- evaluation through the edge runtime

SYNTH_EVAL_SEED = 10_000  # synthetic cameras from here on are never used in training
SYNTH_EVAL_CAMERAS = 4
SYNTH_EVAL_FRAMES = 24


ALARM_THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.98)
"""Candidate pixel thresholds of the image-level alarm: an image alarms when its area of pixels
above the chosen one exceeds a calibrated share of the frame. A stricter pixel threshold than the
mask's trades a little area for far fewer speckles on clean tiles."""


TOP_K = (1, 10, 30, 100, 300)
"""Candidate k of the top-k image score (mean of the k highest pixel probabilities), in frame pixels."""


@dataclass(frozen=True)
class ImageScore:
    """What one image contributes to the metrics, measured at the image's own size.

    ``alarm_areas[i]``: predicted area at ``ALARM_THRESHOLDS[i]``; ``top_scores[i]``: mean of the
    ``TOP_K[i]`` highest probabilities."""

    cls: str
    inter: int
    union: int
    pred_area: int
    true_area: int
    pixels: int
    alarm_areas: tuple[int, ...] = ()
    top_scores: tuple[float, ...] = ()

    def alarm_ratio(self, index: int) -> float:
        return self.alarm_areas[index] / self.pixels


@dataclass(frozen=True)
class Alarm:
    """The image-level alarm rule: area share above ``pixel_threshold`` > ``area_ratio``."""

    index: int
    area_ratio: float

    @property
    def pixel_threshold(self) -> float:
        return ALARM_THRESHOLDS[self.index]

    def fires(self, score: ImageScore) -> bool:
        return score.alarm_ratio(self.index) > self.area_ratio


def score_images(model, images: list[np.ndarray], masks: list[np.ndarray], classes: list[str],
                 batch: int = 8) -> list[ImageScore]:
    """Run ``images`` through an :class:`edge.inference.SegmentationModel` and score each one."""
    threshold = model.postprocess.threshold
    scores = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        for prob, mask, cls in zip(model.infer(chunk), masks[start : start + batch], classes[start : start + batch]):
            pred, true = prob > threshold, mask > 0
            alarm_areas = tuple(int((prob > t).sum()) for t in ALARM_THRESHOLDS)
            scores.append(ImageScore(cls, int((pred & true).sum()), int((pred | true).sum()), int(pred.sum()),
                                     int(true.sum()), int(true.size), alarm_areas, top_scores(prob)))
    return scores


def top_scores(prob: np.ndarray) -> tuple[float, ...]:
    """The top-k image scores of one probability map, for every k of ``TOP_K``."""
    flat = prob.ravel()
    top = np.sort(np.partition(flat, max(0, flat.size - max(TOP_K)))[-max(TOP_K):])[::-1]
    return tuple(float(top[:k].mean()) for k in TOP_K)


def score_set(model, images: ImageSet, batch: int = 8) -> list[ImageScore]:
    return score_images(model, images.images, images.masks, images.classes, batch)


def calibrate_area_threshold(free_ratios: list[float], max_false_alarms: float = 0.05) -> float:
    """Smallest area ratio t such that at most ``max_false_alarms`` of these defect-free images
    have a ratio > t (an image is flagged when its ratio exceeds t)."""
    ratios = np.array(free_ratios, np.float64)
    if not len(ratios):
        return 0.0
    return float(np.quantile(ratios, 1.0 - max_false_alarms, method="higher"))


def calibrate_alarm(train_scores: list[ImageScore], max_false_alarms: float = 0.05) -> Alarm:
    """For each candidate pixel threshold, the area ratio that keeps TRAIN defect-free images
    within the false-alarm budget; of those, the one that finds the most TRAIN defect images
    (ties: the lowest pixel threshold)."""
    free = [s for s in train_scores if s.cls == FREE]
    defect = [s for s in train_scores if s.cls != FREE]
    best: tuple[float, Alarm] | None = None
    for index in range(len(ALARM_THRESHOLDS)):
        alarm = Alarm(index, calibrate_area_threshold([s.alarm_ratio(index) for s in free], max_false_alarms))
        recall = sum(alarm.fires(s) for s in defect) / len(defect) if defect else 0.0
        if best is None or recall > best[0]:
            best = (recall, alarm)
    assert best is not None
    return best[1]


def tile_metrics(scores: list[ImageScore], alarm: Alarm) -> dict[str, float]:
    """Pooled defect IoU and dice, per-class IoU, and image-level detection by ``alarm``."""
    inter = sum(s.inter for s in scores)
    union = sum(s.union for s in scores)
    pred = sum(s.pred_area for s in scores)
    true = sum(s.true_area for s in scores)
    out = {"iou": inter / union if union else 1.0, "dice": 2 * inter / (pred + true) if pred + true else 1.0}
    for cls in DEFECT_CLASSES:
        members = [s for s in scores if s.cls == cls]
        u = sum(s.union for s in members)
        if members:
            out[f"iou_{cls.lower()}"] = sum(s.inter for s in members) / u if u else 1.0
    flagged = [alarm.fires(s) for s in scores]
    tp = sum(f for f, s in zip(flagged, scores) if s.cls != FREE)
    fp = sum(f for f, s in zip(flagged, scores) if s.cls == FREE)
    positives = sum(s.cls != FREE for s in scores)
    negatives = len(scores) - positives
    out |= {
        "image_recall": tp / positives if positives else 1.0,
        "image_precision": tp / (tp + fp) if tp + fp else 1.0,
        "false_alarm_rate": fp / negatives if negatives else 0.0,
        "alarm_pixel_threshold": alarm.pixel_threshold,
        "area_threshold": alarm.area_ratio,
        "val_images": float(len(scores)),
    }
    return out


def with_alarm(manifest, metrics: dict[str, float]):
    """``manifest`` with the image-level alarm that :func:`evaluate_package` calibrated."""
    post = manifest.postprocess.model_copy(update={"alarm_threshold": metrics["alarm_pixel_threshold"],
                                                   "alarm_area_ratio": metrics["area_threshold"]})
    return manifest.model_copy(update={"postprocess": post})


def synthetic_eval_set() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Fresh synthetic conveyor frames (cameras never used in training) with their masks."""
    fresh = load_dataset("synthetic", synthetic_cameras=0)[1]
    return fresh.images, fresh.masks


def synthetic_metrics(model) -> dict[str, float]:
    from edge.postprocess import region_mask, segmentation_metrics

    images, masks = synthetic_eval_set()
    post = model.postprocess
    preds = [region_mask(p, post.threshold, post.min_area) for p in model.infer(images)]
    metrics = segmentation_metrics(preds, masks, post.min_area)
    return {f"synthetic_{k}": metrics[k] for k in ("iou", "recall", "false_alarm_rate")}


def evaluate_package(package, train: ImageSet, val: ImageSet, threads: int = 2, max_false_alarms: float = 0.05,
                     with_synthetic: bool = True) -> dict[str, float]:
    """Val metrics of a package run through :mod:`edge.inference` at each image's own size; the
    image-level alarm is calibrated on ``train`` (:func:`calibrate_alarm`). ``with_synthetic``:
    add the region-level metrics on fresh synthetic cameras."""
    from edge.inference import SegmentationModel

    model = SegmentationModel(package, threads=threads)
    alarm = calibrate_alarm(score_set(model, train), max_false_alarms)
    metrics = tile_metrics(score_set(model, val), alarm)
    return metrics | (synthetic_metrics(model) if with_synthetic else {})
