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
from typing import Any

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


class DataLayoutError(ValueError):
    """A folder handed to :func:`find_items` is not in either layout of the set."""


LAYOUTS = "MT_<Class>/<stem>.jpg + <stem>.png, or MT_<Class>/Imgs/<stem>.jpg + <stem>.png"


def class_order(classes) -> list[str]:
    """``CLASSES`` first in their order, then any other class names alphabetically."""
    names = set(classes)
    return [c for c in CLASSES if c in names] + sorted(names - set(CLASSES))


def find_items(folder: Path) -> list[TileItem]:
    """Every image of ``folder`` in either layout of the set (:data:`LAYOUTS`: the shared one, or the
    original repository's ``Imgs`` sub-folders), sorted by class then name; ``folder`` may also be a
    data root holding ``magnetic-tile/``.

    The class is the folder name after ``MT_``. A class folder that is not one of ``CLASSES``
    (``MT_Scratch``) is kept under its own name and counts as a defect class (only ``Free`` is
    defect-free): a folder of new defects is evaluated rather than silently dropped, and the
    report lists it. Raises :class:`DataLayoutError` naming the folder when it holds no image in
    either layout, or naming the images whose ``.png`` mask is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataLayoutError(f"{folder}: not a folder (expected {LAYOUTS})")
    if not any(folder.glob("MT_*")) and (folder / "magnetic-tile").is_dir():
        folder = folder / "magnetic-tile"
    by_class: dict[str, list[Path]] = {}
    for class_dir in folder.glob("MT_*"):
        if class_dir.is_dir() and class_dir.name[3:]:
            images = list(class_dir.glob("*.jpg")) + list((class_dir / "Imgs").glob("*.jpg"))
            if images:
                by_class[class_dir.name[3:]] = sorted(images)
    if not by_class:
        raise DataLayoutError(f"{folder}: no images in the magnetic-tile layout (expected {LAYOUTS})")
    items = [TileItem(cls, image, image.with_suffix(".png"))
             for cls in class_order(by_class) for image in by_class[cls]]
    missing = [item.image for item in items if not item.mask.is_file()]
    if missing:
        shown = ", ".join(str(p.relative_to(folder)) for p in missing[:3])
        raise DataLayoutError(f"{folder}: {len(missing)} image(s) without a mask <stem>.png beside them "
                              f"({shown}{', ...' if len(missing) > 3 else ''}; expected {LAYOUTS})")
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
        from models.package import make_dataset

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
    ``TOP_K[i]`` highest probabilities. ``package_score`` and ``package_alarm``: the package's own
    image score and verdict, as the edge computes them from the manifest's postprocess
    (:func:`package_verdict`)."""

    cls: str
    inter: int
    union: int
    pred_area: int
    true_area: int
    pixels: int
    alarm_areas: tuple[int, ...] = ()
    top_scores: tuple[float, ...] = ()
    package_score: float = 0.0
    package_alarm: bool = False

    def alarm_ratio(self, index: int) -> float:
        return self.alarm_areas[index] / self.pixels

    @property
    def iou(self) -> float:
        return self.inter / self.union if self.union else 1.0


ALARM_RULES = ("area", "top_k")
TOP_K_FLOOR = 1e-9
"""A top-k threshold calibrated at 0 is stored as this (the manifest wants 0 < alarm_threshold < 1)."""


@dataclass(frozen=True)
class Alarm:
    """An image-level alarm rule: the image's score exceeds ``threshold``.

    ``rule="area"``: score = share of the frame above ``ALARM_THRESHOLDS[index]`` (``threshold`` is
    the area ratio); ``rule="top_k"``: score = mean of the ``TOP_K[index]`` highest probabilities,
    which a blowhole of a few dozen confident pixels lifts while faint speckle does not."""

    index: int
    threshold: float
    rule: str = "area"

    @property
    def area_ratio(self) -> float:
        return self.threshold if self.rule == "area" else 0.0

    @property
    def pixel_threshold(self) -> float | None:
        return ALARM_THRESHOLDS[self.index] if self.rule == "area" else None

    @property
    def top_k(self) -> int | None:
        return TOP_K[self.index] if self.rule == "top_k" else None

    def score(self, score: ImageScore) -> float:
        return score.alarm_ratio(self.index) if self.rule == "area" else score.top_scores[self.index]

    def fires(self, score: ImageScore) -> bool:
        return self.score(score) > self.threshold

    def metrics(self) -> dict[str, float]:
        """The rule as metrics, read back by :func:`with_alarm`: ``alarm_pixel_threshold`` is the
        manifest's ``alarm_threshold`` (the pixel probability of the area rule, or the top-k score
        threshold), ``area_threshold`` its ``alarm_area_ratio`` (0 for top-k), ``alarm_top_k`` its
        ``alarm_top_k`` (0: the area rule)."""
        if self.rule == "area":
            return {"alarm_top_k": 0.0, "alarm_pixel_threshold": ALARM_THRESHOLDS[self.index],
                    "area_threshold": self.threshold}
        return {"alarm_top_k": float(TOP_K[self.index]), "alarm_pixel_threshold": self.threshold, "area_threshold": 0.0}

    def describe(self) -> str:
        if self.rule == "area":
            return f"share of the frame above {ALARM_THRESHOLDS[self.index]:g} > {self.threshold:.3g}"
        return f"mean of the top {TOP_K[self.index]} probabilities > {self.threshold:.4g}"


@dataclass(frozen=True)
class PackageAlarm:
    """The package's own image verdict (``models.package.postprocess.image_alarm`` with its manifest's
    postprocess), as :func:`score_images` recorded it in each score: no re-calibration."""

    postprocess: Any

    def score(self, score: ImageScore) -> float:
        return score.package_score

    def fires(self, score: ImageScore) -> bool:
        return score.package_alarm

    def metrics(self) -> dict[str, float]:
        post = self.postprocess
        if post.alarm_threshold is None:  # any kept defect region
            return {"alarm_top_k": 0.0, "alarm_pixel_threshold": post.threshold, "area_threshold": 0.0}
        if post.alarm_top_k is not None:
            return {"alarm_top_k": float(post.alarm_top_k), "alarm_pixel_threshold": post.alarm_threshold,
                    "area_threshold": 0.0}
        return {"alarm_top_k": 0.0, "alarm_pixel_threshold": post.alarm_threshold,
                "area_threshold": post.alarm_area_ratio}

    def describe(self) -> str:
        post = self.postprocess
        if post.alarm_threshold is None:
            return f"any defect region of {post.min_area}+ pixels above {post.threshold:g} (no calibrated alarm)"
        if post.alarm_top_k is not None:
            return f"mean of the top {post.alarm_top_k} probabilities > {post.alarm_threshold:.4g}"
        return f"share of the frame above {post.alarm_threshold:g} > {post.alarm_area_ratio:.3g}"


def package_verdict(prob: np.ndarray, postprocess) -> tuple[float, bool]:
    """(image score, alarm) of one probability map by the package's own rule, the alarm from
    ``models.package.postprocess.image_alarm`` itself. The score is the top-k mean (``alarm_top_k``), the
    share above ``alarm_threshold`` (area rule), or the share of the frame in kept defect regions
    (no calibrated alarm: any region alarms)."""
    from models.package import image_alarm, regions_from_probabilities, top_k_score

    if postprocess.alarm_threshold is None:
        regions, ratio = regions_from_probabilities(prob, postprocess.threshold, postprocess.min_area)
        return ratio, image_alarm(prob, postprocess, regions)
    if postprocess.alarm_top_k is not None:
        score = top_k_score(prob, postprocess.alarm_top_k)
    else:
        score = float((prob > postprocess.alarm_threshold).mean())
    return score, image_alarm(prob, postprocess, [])


def score_images(model, images: list[np.ndarray], masks: list[np.ndarray], classes: list[str],
                 batch: int = 8) -> list[ImageScore]:
    """Run ``images`` through an :class:`models.package.session.SegmentationModel` and score each one."""
    return [score for _, score in infer_and_score(model, images, masks, classes, batch)]


def infer_and_score(model, images: list[np.ndarray], masks: list[np.ndarray], classes: list[str],
                    batch: int = 8):
    """(probability map, :class:`ImageScore`) of each image, in order, ``batch`` frames per ``infer``."""
    threshold = model.postprocess.threshold
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        for prob, mask, cls in zip(model.infer(chunk), masks[start : start + batch], classes[start : start + batch]):
            pred, true = prob > threshold, mask > 0
            alarm_areas = tuple(int((prob > t).sum()) for t in ALARM_THRESHOLDS)
            verdict = package_verdict(prob, model.postprocess)
            yield prob, ImageScore(cls, int((pred & true).sum()), int((pred | true).sum()), int(pred.sum()),
                                   int(true.sum()), int(true.size), alarm_areas, top_scores(prob), *verdict)


def top_scores(prob: np.ndarray) -> tuple[float, ...]:
    """The top-k image scores of one probability map, for every k of ``TOP_K``."""
    flat = prob.ravel()
    top = np.sort(np.partition(flat, max(0, flat.size - max(TOP_K)))[-max(TOP_K):])[::-1]
    return tuple(float(top[:k].mean(dtype=np.float64)) for k in TOP_K)


def score_set(model, images: ImageSet, batch: int = 8) -> list[ImageScore]:
    return score_images(model, images.images, images.masks, images.classes, batch)


def calibrate_area_threshold(free_ratios: list[float], max_false_alarms: float = 0.05) -> float:
    """Smallest area ratio t such that at most ``max_false_alarms`` of these defect-free images
    have a ratio > t (an image is flagged when its ratio exceeds t)."""
    ratios = np.array(free_ratios, np.float64)
    if not len(ratios):
        return 0.0
    return float(np.quantile(ratios, 1.0 - max_false_alarms, method="higher"))


def calibrate_alarm(train_scores: list[ImageScore], max_false_alarms: float = 0.05,
                    rules: tuple[str, ...] = ALARM_RULES) -> Alarm:
    """Every candidate rule (the area rule at each of ``ALARM_THRESHOLDS``, the top-k rule at each
    of ``TOP_K``) gets the threshold that keeps the calibration set's defect-free images within the
    false-alarm budget (the same "higher" quantile of their scores); of those, the one that finds
    the most defect images of the calibration set (ties: fewer false alarms, then the earlier
    candidate: area rules first, lowest pixel threshold and smallest k first). A top-k rule whose
    threshold would reach 1 (saturated clean tiles) cannot be stored and is skipped."""
    free = [s for s in train_scores if s.cls == FREE]
    defect = [s for s in train_scores if s.cls != FREE]
    candidates = [Alarm(i, 0.0, "area") for i in range(len(ALARM_THRESHOLDS)) if "area" in rules]
    if "top_k" in rules and all(len(s.top_scores) == len(TOP_K) for s in train_scores):
        candidates += [Alarm(i, 0.0, "top_k") for i in range(len(TOP_K))]
    best: tuple[tuple[float, float], Alarm] | None = None
    for candidate in candidates:
        threshold = calibrate_area_threshold([candidate.score(s) for s in free], max_false_alarms)
        if candidate.rule == "top_k":
            if threshold >= 1.0:
                continue
            threshold = max(threshold, TOP_K_FLOOR)
        alarm = Alarm(candidate.index, threshold, candidate.rule)
        recall = sum(alarm.fires(s) for s in defect) / len(defect) if defect else 0.0
        false_alarms = sum(alarm.fires(s) for s in free) / len(free) if free else 0.0
        if best is None or (recall, -false_alarms) > best[0]:
            best = ((recall, -false_alarms), alarm)
    if best is None:
        raise ValueError(f"no alarm rule among {rules} can be calibrated")
    return best[1]


@dataclass(frozen=True)
class PRCurve:
    """Image-level precision-recall of one defect class against the defect-free images.

    ``points``: (threshold, precision, recall) for each distinct image score, highest first, an
    image flagged when its score >= threshold; ``operating_point``: (precision, recall) of the
    alarm itself (score > its threshold); ``average_precision``: sum of (R_n - R_n-1) P_n over the
    points (no interpolation)."""

    cls: str
    points: list[tuple[float, float, float]]
    average_precision: float
    operating_point: tuple[float, float]
    positives: int
    negatives: int

    def as_dict(self) -> dict[str, Any]:
        return {"average_precision": self.average_precision, "positives": self.positives,
                "negatives": self.negatives,
                "operating_point": {"precision": self.operating_point[0], "recall": self.operating_point[1]},
                "points": [list(p) for p in self.points]}


def pr_points(positive: list[float], negative: list[float]) -> list[tuple[float, float, float]]:
    """(threshold, precision, recall) at each distinct score, highest first (flagged: score >= threshold)."""
    if not positive:
        return []
    scores = np.array(list(positive) + list(negative), np.float64)
    labels = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
    tp = np.cumsum(labels)[last]
    precision, recall = tp / (last + 1), tp / len(positive)
    return [(float(scores[i]), float(p), float(r)) for i, p, r in zip(last, precision, recall)]


def average_precision(points: list[tuple[float, float, float]]) -> float:
    ap, previous = 0.0, 0.0
    for _, precision, recall in points:
        ap += (recall - previous) * precision
        previous = recall
    return ap


def pr_curves(scores: list[ImageScore], alarm) -> dict[str, PRCurve]:
    """One :class:`PRCurve` per defect class present (positives: its images, negatives: the
    defect-free ones), scored by ``alarm.score``."""
    negative = [s for s in scores if s.cls == FREE]
    curves = {}
    for cls in class_order(s.cls for s in scores):
        positive = [s for s in scores if s.cls == cls]
        if cls == FREE or not positive:
            continue
        points = pr_points([alarm.score(s) for s in positive], [alarm.score(s) for s in negative])
        tp = sum(alarm.fires(s) for s in positive)
        fp = sum(alarm.fires(s) for s in negative)
        curves[cls] = PRCurve(cls, points, average_precision(points),
                              (tp / (tp + fp) if tp + fp else 1.0, tp / len(positive)), len(positive), len(negative))
    return curves


def _pooled(members: list[ImageScore]) -> tuple[float, float]:
    inter = sum(s.inter for s in members)
    union = sum(s.union for s in members)
    pred = sum(s.pred_area for s in members)
    true = sum(s.true_area for s in members)
    return inter / union if union else 1.0, 2 * inter / (pred + true) if pred + true else 1.0


def tile_metrics(scores: list[ImageScore], alarm) -> dict[str, float]:
    """Segmentation and image-level metrics of ``scores`` under ``alarm`` (an :class:`Alarm` or the
    package's own :class:`PackageAlarm`).

    ``iou``/``dice``: pooled over all images (false pixels on clean tiles count);
    ``iou_defect_images``/``dice_defect_images``: pooled over the defect images only (the issue's
    headline); ``iou_<class>``: pooled over that class's images; ``image_recall`` on defect images,
    ``false_alarm_rate`` on ``Free`` images, ``image_precision``; ``ap_<class>``: average precision
    of that class against the ``Free`` images (:func:`pr_curves`); the rule (:meth:`Alarm.metrics`)."""
    out: dict[str, float] = dict(zip(("iou", "dice"), _pooled(scores)))
    defects = [s for s in scores if s.cls != FREE]
    if defects:
        out |= dict(zip(("iou_defect_images", "dice_defect_images"), _pooled(defects)))
    for cls in class_order(s.cls for s in defects):
        out[f"iou_{cls.lower()}"] = _pooled([s for s in scores if s.cls == cls])[0]
    flagged = [alarm.fires(s) for s in scores]
    tp = sum(f for f, s in zip(flagged, scores) if s.cls != FREE)
    fp = sum(f for f, s in zip(flagged, scores) if s.cls == FREE)
    positives = len(defects)
    negatives = len(scores) - positives
    out |= {
        "image_recall": tp / positives if positives else 1.0,
        "image_precision": tp / (tp + fp) if tp + fp else 1.0,
        "false_alarm_rate": fp / negatives if negatives else 0.0,
    }
    out |= {f"ap_{cls.lower()}": curve.average_precision for cls, curve in pr_curves(scores, alarm).items()}
    return out | alarm.metrics() | {"val_images": float(len(scores))}


def with_alarm(manifest, metrics: dict[str, float]):
    """``manifest`` with the image-level alarm that :func:`evaluate_package` calibrated
    (:meth:`Alarm.metrics`): the area rule, or the top-k rule (``alarm_top_k``)."""
    top_k = int(metrics.get("alarm_top_k", 0))
    post = manifest.postprocess.model_copy(update={"alarm_threshold": metrics["alarm_pixel_threshold"],
                                                   "alarm_area_ratio": metrics["area_threshold"],
                                                   "alarm_top_k": top_k or None})
    return manifest.model_copy(update={"postprocess": post})


def synthetic_eval_set() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Fresh synthetic conveyor frames (cameras never used in training) with their masks."""
    fresh = load_dataset("synthetic", synthetic_cameras=0)[1]
    return fresh.images, fresh.masks


def synthetic_metrics(model) -> dict[str, float]:
    from models.package import region_mask, segmentation_metrics

    images, masks = synthetic_eval_set()
    post = model.postprocess
    preds = [region_mask(p, post.threshold, post.min_area) for p in model.infer(images)]
    metrics = segmentation_metrics(preds, masks, post.min_area)
    return {f"synthetic_{k}": metrics[k] for k in ("iou", "recall", "false_alarm_rate")}


def evaluate_package(package, train: ImageSet, val: ImageSet, threads: int = 2, max_false_alarms: float = 0.05,
                     with_synthetic: bool = True) -> dict[str, float]:
    """Val metrics of a package run through :mod:`models.package.session` at each image's own size; the
    image-level alarm is calibrated on ``train`` (:func:`calibrate_alarm`). ``with_synthetic``:
    add the region-level metrics on fresh synthetic cameras."""
    from models.package import SegmentationModel

    model = SegmentationModel(package, threads=threads)
    alarm = calibrate_alarm(score_set(model, train), max_false_alarms)
    metrics = tile_metrics(score_set(model, val), alarm)
    return metrics | (synthetic_metrics(model) if with_synthetic else {})
