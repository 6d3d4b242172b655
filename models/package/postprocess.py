"""Probability maps to defect regions, the defect ratio and the image-level alarm.

Pure functions on numpy arrays: no sessions, no I/O. The quality measures that judge the regions
against true masks are :mod:`models.package.evaluation`.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from models.package.manifest import SegmentationPostprocess
from stream.messages import DefectRegion


def mask_from_probabilities(prob: np.ndarray, threshold: float) -> np.ndarray:
    """Binary defect mask (uint8, 1 = defect) of the pixels whose probability exceeds ``threshold``."""
    return (prob > threshold).astype(np.uint8)


def regions_from_probabilities(
    prob: np.ndarray, threshold: float, min_area: int, cls: str = "defect"
) -> tuple[list[DefectRegion], float]:
    """Connected defect regions of at least ``min_area`` pixels, and the defect ratio.

    Each region carries its area, bbox (x, y, w, h) and score (mean probability inside it). The
    defect ratio is the share of the frame's pixels that lie in the kept regions.
    """
    regions, kept = _components(prob, threshold, min_area, cls)
    return regions, float(kept.sum()) / float(prob.size) if prob.size else 0.0


def image_alarm(prob: np.ndarray, postprocess: SegmentationPostprocess, regions: Sequence[DefectRegion]) -> bool:
    """The package's image-level verdict: the mean of the ``alarm_top_k`` highest probabilities
    exceeds ``alarm_threshold``, or (no ``alarm_top_k``) the share of pixels above ``alarm_threshold``
    exceeds ``alarm_area_ratio``; calibrated at a false-alarm budget when the package was built.
    A package without a calibrated alarm flags any kept defect region."""
    if postprocess.alarm_threshold is None:
        return bool(regions)
    if postprocess.alarm_top_k is not None:
        return top_k_score(prob, postprocess.alarm_top_k) > postprocess.alarm_threshold
    return float((prob > postprocess.alarm_threshold).mean()) > postprocess.alarm_area_ratio


def top_k_score(prob: np.ndarray, k: int) -> float:
    """Mean of the ``k`` highest probabilities: high for a small confident defect (a blowhole of a
    few dozen pixels), low for scattered faint speckle, unlike the share of pixels above a threshold."""
    flat = prob.ravel()
    k = min(k, flat.size)
    return float(np.partition(flat, flat.size - k)[flat.size - k :].mean(dtype=np.float64)) if k else 0.0


def region_mask(prob: np.ndarray, threshold: float, min_area: int) -> np.ndarray:
    """Like :func:`mask_from_probabilities` but only pixels of regions of ``min_area`` or more."""
    return _components(prob, threshold, min_area, "defect")[1]


def _components(prob: np.ndarray, threshold: float, min_area: int, cls: str) -> tuple[list[DefectRegion], np.ndarray]:
    mask = mask_from_probabilities(prob, threshold)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    regions: list[DefectRegion] = []
    if count <= 1:
        return regions, np.zeros_like(mask)
    sums = np.bincount(labels.ravel(), weights=prob.ravel().astype(np.float64), minlength=count)
    keep = []
    for label in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[label])
        if area < max(1, min_area):
            continue
        score = min(1.0, max(0.0, sums[label] / area))
        regions.append(DefectRegion(cls=cls, area=area, bbox=(x, y, w, h), score=score))
        keep.append(label)
    kept = np.isin(labels, keep).astype(np.uint8) if keep else np.zeros_like(mask)
    regions.sort(key=lambda r: r.area, reverse=True)
    return regions, kept
