"""Camera frames to a segmentation model's input, as its manifest's preprocessing says.

Gray or colour, resized to the manifest's ``height x width`` (``fixed``) or kept at the frame's own
size (``native``, downscaled to ``max_side`` if set), then scale/mean/std; native inputs are padded
by mirroring to a multiple of the net's stride and grouped by padded size, one ``session.run`` per
group. Training (the torch datasets, the int8 calibration) and the edge runtime share these
functions, so a model sees the same input in both. Pure numpy/OpenCV: no sessions, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from models.package.manifest import SegmentationPreprocess


def preprocess_frame(image: np.ndarray, spec: SegmentationPreprocess) -> np.ndarray:
    """One frame (H,W,3 BGR or H,W gray, uint8) to the model's [C, h, w] float32 input: resized to
    ``height x width`` (``fixed``), or at its own size, downscaled to ``max_side`` if set (``native``)."""
    if image.ndim == 3 and spec.grayscale:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    elif image.ndim == 2 and not spec.grayscale:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    height, width = input_size(image.shape[:2], spec)
    if image.shape[:2] != (height, width):
        shrinking = image.shape[0] > height or image.shape[1] > width
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    x = (image.astype(np.float32) * spec.scale - spec.mean) / spec.std
    return x[None] if x.ndim == 2 else np.ascontiguousarray(x.transpose(2, 0, 1))


def input_size(frame: tuple[int, int], spec: SegmentationPreprocess) -> tuple[int, int]:
    """(h, w) of the model input for a frame of ``frame`` = (H, W), before any padding."""
    if spec.resize == "fixed":
        return spec.height, spec.width
    longest = max(frame)
    if spec.max_side is None or longest <= spec.max_side:
        return frame
    ratio = spec.max_side / longest
    return max(1, round(frame[0] * ratio)), max(1, round(frame[1] * ratio))


def reference_input(spec: SegmentationPreprocess) -> tuple[int, int]:
    """(h, w) of the model input for the manifest's reference frame: height x width, padded to
    ``pad_multiple`` when native (seg-tiles: the median tile 325x270 runs at 336x272)."""
    if spec.resize == "native":
        return padded_size((spec.height, spec.width), spec.pad_multiple)
    return spec.height, spec.width


def padded_size(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    return -(-size[0] // multiple) * multiple, -(-size[1] // multiple) * multiple


def pad_input(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[C,h,w] -> [C,H,W] by mirroring the bottom and right edges (a mirrored border looks like the
    surface to the net; zeros would look like a dark defect)."""
    pad_h, pad_w = size[0] - x.shape[1], size[1] - x.shape[2]
    if not pad_h and not pad_w:
        return x
    mode = "reflect" if pad_h < x.shape[1] and pad_w < x.shape[2] else "symmetric"
    return np.pad(x, ((0, 0), (0, pad_h), (0, pad_w)), mode=mode)


def native_buckets(inputs: Sequence[np.ndarray], multiple: int) -> dict[tuple[int, int], list[int]]:
    """Frame indexes grouped by padded input size: one ``session.run`` per group, so cameras of one
    resolution batch together and no frame is padded beyond its own next multiple."""
    buckets: dict[tuple[int, int], list[int]] = {}
    for index, x in enumerate(inputs):
        buckets.setdefault(padded_size(x.shape[1:], multiple), []).append(index)
    return buckets
