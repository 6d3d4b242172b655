"""``eval-seg``'s evaluation and its pictures: a package run through the edge runtime on a folder of
tiles or on the val split, per-image scores kept with their names, and PNGs of the worst and best
images (frame | truth | prediction) and of the per-class precision-recall curves.

ONNX Runtime, numpy and cv2 only (no torch, no matplotlib): it runs wherever the edge runs. The
metrics themselves live in :mod:`models.tiles`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from models import tiles

OVERLAY_COUNT = 6
"""Default N: the worst N and the best N defect images by IoU."""
MIN_PANEL = (240, 160)
"""Smallest panel (height, width): small tiles are enlarged by a whole factor (nearest neighbour)."""
HEADER = 44
"""Two text lines above the panels: class / stem / IoU, then each panel's name."""
GAP = 6
PANELS = ("frame", "truth", "prediction")
PRED_COLOR = (0, 0, 255)  # BGR red: the prediction (fill and contour)
TRUTH_COLOR = (0, 200, 0)  # BGR green: the truth contour on the prediction panel
CLASS_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                (140, 86, 75), (227, 119, 194), (127, 127, 127))
"""RGB, one per defect class in :func:`tiles.class_order` order (converted to BGR when drawn)."""


@dataclass(frozen=True)
class Sample:
    """One image to evaluate: its class, a name (the file stem) and how to load (image, mask)."""

    cls: str
    name: str
    load: Callable[[], tuple[np.ndarray, np.ndarray]]


def samples_from_items(items: Sequence[tiles.TileItem]) -> list[Sample]:
    return [Sample(item.cls, item.image.stem, item.load) for item in items]


def samples_from_set(images: tiles.ImageSet, prefix: str = "frame") -> list[Sample]:
    return [Sample(cls, f"{prefix}{i:04d}", (lambda i=i: (images.images[i], images.masks[i])))
            for i, cls in enumerate(images.classes)]


@dataclass
class Evaluation:
    """A package's per-image scores on ``samples`` and the metrics under ``alarm``."""

    model: Any
    samples: list[Sample]
    scores: list[tiles.ImageScore]
    alarm: Any
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.metrics = tiles.tile_metrics(self.scores, self.alarm) | self.metrics

    @property
    def curves(self) -> dict[str, tiles.PRCurve]:
        return tiles.pr_curves(self.scores, self.alarm)

    @property
    def classes(self) -> dict[str, int]:
        counts = Counter(s.cls for s in self.samples)
        return {cls: counts[cls] for cls in tiles.class_order(counts)}

    def class_rows(self) -> list[dict[str, Any]]:
        """Per class: images, pooled IoU, image recall (or false-alarm rate for ``Free``), AP."""
        curves = self.curves
        rows = []
        for cls, count in self.classes.items():
            members = [s for s in self.scores if s.cls == cls]
            flagged = sum(self.alarm.fires(s) for s in members) / len(members)
            curve = curves.get(cls)
            rows.append({"class": cls, "images": count,
                         "iou": None if cls == tiles.FREE else self.metrics[f"iou_{cls.lower()}"],
                         "flagged": flagged,
                         "precision": curve.operating_point[0] if curve else None,
                         "average_precision": curve.average_precision if curve else None})
        return rows


def score_samples(model, samples: Sequence[Sample], batch: int = 8) -> list[tiles.ImageScore]:
    """Every sample through ``model`` (an :class:`models.package.session.SegmentationModel`), ``batch``
    frames loaded at a time."""
    scores: list[tiles.ImageScore] = []
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        loaded = [s.load() for s in chunk]
        scores += tiles.score_images(model, [im for im, _ in loaded], [m for _, m in loaded], [s.cls for s in chunk],
                                     batch)
    return scores


def evaluate_folder(package, folder: Path, threads: int = 2) -> Evaluation:
    """Every image of ``folder`` (:func:`tiles.find_items`) through the edge runtime; the image
    verdict is the package's own alarm (:class:`tiles.PackageAlarm`), not a re-calibration."""
    from models.package import SegmentationModel

    samples = samples_from_items(tiles.find_items(folder))
    model = SegmentationModel(package, threads=threads)
    return Evaluation(model, samples, score_samples(model, samples), tiles.PackageAlarm(model.postprocess))


def evaluate_split(package, train: tiles.ImageSet, val: list[Sample], threads: int = 2,
                   max_false_alarms: float = 0.05, with_synthetic: bool = True) -> Evaluation:
    """``val`` through the edge runtime, the alarm calibrated on ``train`` (:func:`tiles.calibrate_alarm`):
    :func:`tiles.evaluate_package`'s metrics, with the per-image scores kept."""
    from models.package import SegmentationModel

    model = SegmentationModel(package, threads=threads)
    alarm = tiles.calibrate_alarm(tiles.score_set(model, train), max_false_alarms)
    extra = tiles.synthetic_metrics(model) if with_synthetic else {}
    return Evaluation(model, val, score_samples(model, val), alarm, extra)


# ---------------------------------------------------------------- pictures


def pick_overlays(evaluation: Evaluation, count: int = OVERLAY_COUNT) -> list[tuple[str, int]]:
    """("worst" | "best", sample index): the ``count`` defect images of lowest IoU, lowest first,
    then the ``count`` of highest IoU among the rest, highest first (ties by name). With fewer than
    ``2 * count`` defect images the worst take their share first, and no image appears twice."""
    defects = [i for i, s in enumerate(evaluation.scores) if s.cls != tiles.FREE]
    ranked = sorted(defects, key=lambda i: (evaluation.scores[i].iou, evaluation.samples[i].name))
    worst = ranked[:count]
    best = [i for i in reversed(ranked[len(worst):])][:count]
    return [("worst", i) for i in worst] + [("best", i) for i in best]


def overlay_geometry(height: int, width: int) -> tuple[int, int, int]:
    """(scale, panel height, panel width) of a frame of ``height`` x ``width``."""
    scale = max(1, math.ceil(MIN_PANEL[0] / height), math.ceil(MIN_PANEL[1] / width))
    return scale, height * scale, width * scale


def overlay_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) of the overlay PNG of such a frame."""
    _, ph, pw = overlay_geometry(height, width)
    return HEADER + ph, len(PANELS) * pw + (len(PANELS) - 1) * GAP


def panel_origin(index: int, height: int, width: int) -> tuple[int, int]:
    """(y, x) of panel ``index``'s top-left corner."""
    _, _, pw = overlay_geometry(height, width)
    return HEADER, index * (pw + GAP)


def draw_overlay(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, title: str, iou: float) -> np.ndarray:
    """BGR picture: ``title`` and IoU on top, then the frame, the truth mask (white on black) and
    the frame with the prediction as a red overlay and contour, the truth's contour in green."""
    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    h, w = gray.shape
    scale, ph, pw = overlay_geometry(h, w)

    def up(a: np.ndarray) -> np.ndarray:
        return cv2.resize(a, (pw, ph), interpolation=cv2.INTER_NEAREST)

    frame = cv2.cvtColor(up(gray), cv2.COLOR_GRAY2BGR)
    truth_up, pred_up = up((truth > 0).astype(np.uint8)), up((pred > 0).astype(np.uint8))
    truth_panel = cv2.cvtColor(truth_up * 255, cv2.COLOR_GRAY2BGR)
    pred_panel = frame.copy()
    tint = np.zeros_like(frame)
    tint[:] = PRED_COLOR
    blend = cv2.addWeighted(frame, 0.5, tint, 0.5, 0)
    pred_panel[pred_up > 0] = blend[pred_up > 0]
    contours, _ = cv2.findContours(pred_up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(pred_panel, contours, -1, PRED_COLOR, 1)
    contours, _ = cv2.findContours(truth_up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(pred_panel, contours, -1, TRUTH_COLOR, 1)

    out_h, out_w = overlay_size(h, w)
    canvas = np.full((out_h, out_w, 3), 40, np.uint8)
    for index, panel in enumerate((frame, truth_panel, pred_panel)):
        y, x = panel_origin(index, h, w)
        canvas[y : y + ph, x : x + pw] = panel
    _text(canvas, f"{title}  IoU {iou:.3f}", (4, 17), out_w - 8, (255, 255, 255))
    for index, name in enumerate(PANELS):
        _text(canvas, name, (panel_origin(index, h, w)[1] + 4, HEADER - 7), pw - 8, (200, 200, 200))
    return canvas


def _text(canvas: np.ndarray, text: str, origin: tuple[int, int], max_width: int, color: tuple[int, int, int],
          font_scale: float = 0.5) -> None:
    """``text`` at ``origin`` (bottom-left), shrunk to fit ``max_width`` pixels."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    width = cv2.getTextSize(text, font, font_scale, 1)[0][0]
    if width > max_width > 0:
        font_scale *= max_width / width
    cv2.putText(canvas, text, origin, font, font_scale, color, 1, cv2.LINE_AA)


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def write_overlays(evaluation: Evaluation, folder: Path, count: int = OVERLAY_COUNT) -> list[Path]:
    """``<worst|best>_<rank>_<class>_<stem>.png`` for :func:`pick_overlays`, and ``pr_curve.png``.

    The prediction drawn is the one the IoU counts: pixels above the package's ``threshold``."""
    folder.mkdir(parents=True, exist_ok=True)
    picks = pick_overlays(evaluation, count)
    loaded = [evaluation.samples[i].load() for _, i in picks]
    probs = evaluation.model.infer([image for image, _ in loaded]) if loaded else []
    threshold = evaluation.model.postprocess.threshold
    written = []
    ranks: Counter[str] = Counter()
    for (kind, i), (image, truth), prob in zip(picks, loaded, probs):
        sample, score = evaluation.samples[i], evaluation.scores[i]
        ranks[kind] += 1
        path = folder / safe_name(f"{kind}_{ranks[kind]:02d}_{sample.cls}_{sample.name}.png")
        _write_png(path, draw_overlay(image, truth, prob > threshold, f"{sample.cls} / {sample.name}", score.iou))
        written.append(path)
    path = folder / "pr_curve.png"
    _write_png(path, draw_pr_curves(evaluation.curves, evaluation.model.package_id))
    return written + [path]


def _write_png(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image):
        raise OSError(f"cannot write {path}")


PLOT = (520, 520)
"""(height, width) of the precision-recall plot; the legend is drawn on its right."""
PLOT_MARGIN = (40, 56, 50, 20)  # top, left, bottom, right inside the plot area
LEGEND_WIDTH = 260


def plot_point(recall: float, precision: float) -> tuple[int, int]:
    """Pixel (x, y) of a (recall, precision) point on the plot."""
    top, left, bottom, right = PLOT_MARGIN
    w, h = PLOT[1] - left - right, PLOT[0] - top - bottom
    return int(round(left + recall * w)), int(round(top + (1 - precision) * h))


def draw_pr_curves(curves: dict[str, tiles.PRCurve], title: str = "") -> np.ndarray:
    """BGR plot of one precision-recall curve per class (recall on x, precision on y), each with
    its operating point (the alarm) as a filled circle; legend: class, AP, images."""
    canvas = np.full((PLOT[0], PLOT[1] + LEGEND_WIDTH, 3), 255, np.uint8)
    top, left, bottom, right = PLOT_MARGIN
    x0, y0 = plot_point(0, 0)
    x1, y1 = plot_point(1, 1)
    for tick in np.linspace(0, 1, 6):
        x, _ = plot_point(tick, 0)
        _, y = plot_point(0, tick)
        cv2.line(canvas, (x, y1), (x, y0), (225, 225, 225), 1)
        cv2.line(canvas, (x0, y), (x1, y), (225, 225, 225), 1)
        _text(canvas, f"{tick:.1f}", (x - 10, y0 + 18), 40, (60, 60, 60), 0.45)
        _text(canvas, f"{tick:.1f}", (x0 - 34, y + 5), 40, (60, 60, 60), 0.45)
    cv2.rectangle(canvas, (x0, y1), (x1, y0), (0, 0, 0), 1)
    _text(canvas, "recall", ((x0 + x1) // 2 - 20, y0 + 38), 80, (0, 0, 0))
    _text(canvas, "precision", (4, y1 - 10), 100, (0, 0, 0))
    _text(canvas, title or "precision-recall per class", (left + 70, 22), PLOT[1] + LEGEND_WIDTH - left - 80, (0, 0, 0))
    colors = [tuple(reversed(CLASS_COLORS[n % len(CLASS_COLORS)])) for n in range(len(curves))]
    for color, curve in zip(colors, curves.values()):
        if curve.points:
            pts, previous = [], 0.0  # steps: precision p_n holds over recall (r_n-1, r_n], as AP counts it
            for _, prec, rec in curve.points:
                pts += [plot_point(previous, prec), plot_point(rec, prec)]
                previous = rec
            cv2.polylines(canvas, [np.array(pts, np.int32)], False, color, 2, cv2.LINE_AA)
    for n, (color, (cls, curve)) in enumerate(zip(colors, curves.items())):  # the points over every curve
        op = plot_point(curve.operating_point[1], curve.operating_point[0])
        cv2.circle(canvas, op, 6, color, -1, cv2.LINE_AA)
        cv2.circle(canvas, op, 6, (0, 0, 0), 1, cv2.LINE_AA)
        ly = top + 10 + 26 * n
        cv2.line(canvas, (PLOT[1] + 4, ly), (PLOT[1] + 30, ly), color, 3)
        _text(canvas, f"{cls}  AP {curve.average_precision:.2f}  n={curve.positives}", (PLOT[1] + 36, ly + 5),
              LEGEND_WIDTH - 40, (0, 0, 0))
    ly = top + 10 + 26 * len(curves)
    cv2.circle(canvas, (PLOT[1] + 17, ly), 6, (90, 90, 90), -1, cv2.LINE_AA)
    _text(canvas, "operating point (alarm)", (PLOT[1] + 36, ly + 5), LEGEND_WIDTH - 40, (0, 0, 0))
    negatives = next(iter(curves.values())).negatives if curves else 0
    _text(canvas, f"negatives: {negatives} Free images", (PLOT[1] + 8, ly + 30), LEGEND_WIDTH - 12, (0, 0, 0), 0.45)
    return canvas
