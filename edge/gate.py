"""Change gating: skip inference on a camera whose scene has not changed, and reuse its last
result. A conveyor that stops, an empty belt, a static fixture: most frames of a factory camera
are repeats, and the cheapest inference is the one not run.

The test is a mean absolute difference of 32x24 gray thumbnails (about 0.05 ms a frame), against
the thumbnail of the last frame that WAS inferred, so a slow drift still triggers once it adds up.
A gated camera is re-inferred at least every ``max_age_s`` whatever the difference.
"""

from __future__ import annotations

import cv2
import numpy as np

THUMBNAIL = (32, 24)


def thumbnail(image: np.ndarray) -> np.ndarray:
    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return cv2.resize(gray, THUMBNAIL, interpolation=cv2.INTER_AREA).astype(np.float32)


class ChangeGate:
    """``threshold``: mean absolute gray-level difference (0-255) below which a frame is a repeat;
    0 turns the gate off."""

    def __init__(self, threshold: float = 0.0, max_age_s: float = 2.0) -> None:
        self.threshold = threshold
        self.max_age_s = max_age_s
        self._reference: np.ndarray | None = None
        self._reference_ts = 0.0
        self.gated = 0

    def set_threshold(self, threshold: float) -> None:
        if not 0.0 <= threshold <= 255.0:
            raise ValueError(f"gate threshold must be within 0..255 (got {threshold:g})")
        self.threshold = threshold

    def should_infer(self, image: np.ndarray, ts: float) -> bool:
        """True when the frame must be inferred (it becomes the new reference); False (and
        counted) when the last result may stand for it."""
        if self.threshold <= 0.0:
            return True
        small = thumbnail(image)
        stale = self._reference is None or ts - self._reference_ts >= self.max_age_s
        if stale or float(np.abs(small - self._reference).mean()) >= self.threshold:
            self._reference, self._reference_ts = small, ts
            return True
        self.gated += 1
        return False
