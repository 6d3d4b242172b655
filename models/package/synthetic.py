"""A synthetic factory: a camera over a conveyor belt and an industrial water pump.

Both are seeded and reproducible with no hidden state: a camera frame is a pure function of
``(seed, index)`` and so is a pump sample, whatever order they are asked for in. Per-part and
per-episode randomness comes from generators keyed on the seed and the part / episode number,
never from a shared generator that advances as frames are drawn.

Camera scene: a striped, grainy belt moving left to right at ``part_speed`` frame widths per
second; metal discs and plates of varying size and brightness riding on it; each part carries
a defect with probability ``defect_rate`` (scratch, crack, pit, stain; darker or brighter than
the part); slow lighting drift, vignetting and sensor noise. The mask marks defect pixels
visible in the frame.

Pump: the 8 channels of SKAB, driven by a slow load cycle (current, flow and pressure follow
load, temperatures lag it), plus white sensor noise and injected anomaly episodes (spikes,
drifts, level shifts, vibration bursts) with ground-truth labels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

# Tags keep the random streams of one seed apart.
_PART, _NOISE, _LIGHT, _BELT, _EPISODE, _PUMP_NOISE, _PUMP_VIB, _PUMP_SHAPE = range(1, 9)

DEFECT_TYPES = ("scratch", "crack", "pit", "stain")


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *(int(k) for k in keys)])


# ---------------------------------------------------------------- camera


@dataclass(frozen=True)
class SyntheticFrame:
    index: int
    image: np.ndarray  # H, W, 3 uint8 BGR
    mask: np.ndarray  # H, W uint8, 1 = defect pixel


@dataclass(frozen=True)
class _Part:
    patch: np.ndarray  # S, S float32 gray levels
    alpha: np.ndarray  # S, S bool, part pixels
    defect: np.ndarray  # S, S uint8, defect pixels
    t_enter: float  # time its centre is one radius left of the frame
    cy: int
    radius: int


class SyntheticCamera:
    """A deterministic conveyor-belt camera: ``frame(i)`` depends only on the seed and ``i``."""

    def __init__(
        self,
        seed: int,
        width: int = 320,
        height: int = 240,
        fps: float = 10.0,
        defect_rate: float = 0.15,
        part_speed: float = 0.2,
    ) -> None:
        if width < 64 or height < 48 or fps <= 0 or part_speed <= 0 or not 0 <= defect_rate <= 1:
            raise ValueError("camera needs width>=64, height>=48, fps>0, part_speed>0, 0<=defect_rate<=1")
        self.seed, self.width, self.height, self.fps = seed, width, height, fps
        self.defect_rate, self.part_speed = defect_rate, part_speed
        self._scale = min(width / 320, height / 240)
        self._speed_px = part_speed * width  # px per second
        self._gap = 0.7 / part_speed  # seconds between parts entering
        self._max_radius = int(42 * self._scale) + 2
        rng = _rng(seed, _BELT)
        self._belt = self._make_belt(rng)
        self._vignette = self._make_vignette()
        self._noise_sigma = float(rng.uniform(1.5, 3.0))
        self._tint = rng.uniform(0.92, 1.05, size=3).astype(np.float32)
        self._light_phase = float(rng.uniform(0, 2 * np.pi))
        self._parts = functools.lru_cache(maxsize=64)(self._make_part)

    # -- scene pieces

    def _make_belt(self, rng: np.random.Generator) -> np.ndarray:
        """One belt period (H, P): cleat stripes across the motion plus grain; tiled and rolled."""
        period = int(round(rng.uniform(28, 44) * self._scale))
        base = rng.uniform(50, 85)
        x = np.arange(period)
        cleat = np.where(x < max(2, period // 8), -18.0, 0.0) + 4.0 * np.sin(2 * np.pi * x / period)
        grain = cv2.GaussianBlur(rng.normal(0, 7, (self.height, period)).astype(np.float32), (0, 0), 1.2)
        belt = base + cleat[None, :] + grain
        rail = max(4, int(self.height * 0.06))
        belt[:rail] = base * 0.55
        belt[-rail:] = base * 0.55
        return belt.astype(np.float32)

    def _make_vignette(self) -> np.ndarray:
        yy, xx = np.mgrid[0 : self.height, 0 : self.width].astype(np.float32)
        r2 = ((xx - self.width / 2) / self.width) ** 2 + ((yy - self.height / 2) / self.height) ** 2
        return (1.0 - 0.35 * r2).astype(np.float32)

    def _make_part(self, n: int) -> _Part:
        rng = _rng(self.seed, _PART, n)
        radius = int(rng.uniform(22, 40) * self._scale)
        size = 2 * self._max_radius + 1
        centre = (self._max_radius, self._max_radius)
        alpha = np.zeros((size, size), np.uint8)
        if rng.random() < 0.5:
            cv2.circle(alpha, centre, radius, 1, -1)
        else:
            w, h = radius * 2 * rng.uniform(0.75, 1.0), radius * 2 * rng.uniform(0.5, 0.85)
            box = cv2.boxPoints((centre, (w, h), float(rng.uniform(0, 180))))
            cv2.fillPoly(alpha, [np.round(box).astype(np.int32)], 1)
        patch = self._part_surface(rng, size)
        rim = alpha - cv2.erode(alpha, np.ones((3, 3), np.uint8))
        patch -= 25.0 * rim
        defect = np.zeros_like(alpha)
        if rng.random() < self.defect_rate:
            defect = self._draw_defect(rng, alpha, patch)
        t_enter = (n - 2) * self._gap + rng.uniform(0, 0.3 * self._gap)
        cy = int(rng.uniform(0.3, 0.7) * self.height)
        return _Part(patch, alpha.astype(bool), defect, t_enter, cy, radius)

    @staticmethod
    def _part_surface(rng: np.random.Generator, size: int) -> np.ndarray:
        """Brushed metal: a brightness level, a gentle gradient and horizontal streaks."""
        level = rng.uniform(110, 205)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
        angle = rng.uniform(0, 2 * np.pi)
        gradient = 18.0 * (np.cos(angle) * xx + np.sin(angle) * yy)
        streaks = cv2.GaussianBlur(rng.normal(0, 6, (size, size)).astype(np.float32), (0, 0), sigmaX=6, sigmaY=0.6)
        return (level + gradient + streaks).astype(np.float32)

    def _draw_defect(self, rng: np.random.Generator, alpha: np.ndarray, patch: np.ndarray) -> np.ndarray:
        inner = cv2.erode(alpha, np.ones((9, 9), np.uint8))
        ys, xs = np.nonzero(inner)
        if len(xs) == 0:
            return np.zeros_like(alpha)
        k = rng.integers(len(xs))
        at = np.array([xs[k], ys[k]], dtype=np.float64)
        kind = DEFECT_TYPES[int(rng.integers(len(DEFECT_TYPES)))]
        mask = np.zeros_like(alpha)
        s = self._scale
        if kind == "scratch":
            direction = rng.uniform(0, 2 * np.pi)
            length = rng.uniform(15, 40) * s
            end = at + length * np.array([np.cos(direction), np.sin(direction)])
            cv2.line(mask, _pt(at), _pt(end), 1, int(rng.integers(2, 4)))
        elif kind == "crack":
            direction, points = rng.uniform(0, 2 * np.pi), [at]
            for _ in range(int(rng.integers(4, 8))):
                direction += rng.normal(0, 0.7)
                points.append(points[-1] + rng.uniform(4, 8) * s * np.array([np.cos(direction), np.sin(direction)]))
            cv2.polylines(mask, [np.round(points).astype(np.int32)], False, 1, int(rng.integers(2, 4)))
        elif kind == "pit":
            axes = (max(2, int(rng.uniform(3, 6.5) * s)), max(2, int(rng.uniform(2.5, 5.5) * s)))
            cv2.ellipse(mask, _pt(at), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        else:  # stain: a few overlapping blobs
            for _ in range(int(rng.integers(3, 7))):
                c = at + rng.normal(0, 5 * s, 2)
                axes = (max(2, int(rng.uniform(3, 9) * s)), max(2, int(rng.uniform(3, 7) * s)))
                cv2.ellipse(mask, _pt(c), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        mask &= cv2.erode(alpha, np.ones((5, 5), np.uint8))
        dark = kind == "pit" or rng.random() < 0.7
        contrast = rng.uniform(40, 80) * (-1.0 if dark else 1.0)
        texture = rng.uniform(0.8, 1.0, mask.shape).astype(np.float32)
        patch += contrast * texture * mask
        return mask

    # -- frames

    def _visible_parts(self, t: float) -> list[_Part]:
        span = (self.width + 2 * self._max_radius) / self._speed_px
        first = max(0, int(np.floor((t - span) / self._gap)) + 1)
        last = int(np.floor(t / self._gap)) + 3
        return [self._parts(n) for n in range(first, last + 1)]

    def frame(self, index: int) -> SyntheticFrame:
        if index < 0:
            raise ValueError("frame index must be >= 0")
        t = index / self.fps
        offset = int(round(t * self._speed_px))
        cols = (np.arange(self.width) - offset) % self._belt.shape[1]
        gray = self._belt[:, cols].copy()
        mask = np.zeros((self.height, self.width), np.uint8)
        for part in self._visible_parts(t):
            cx = int(round((t - part.t_enter) * self._speed_px - part.radius))
            _paste(gray, mask, part, cx, part.cy)
        rng = _rng(self.seed, _NOISE, index)
        gain = 1.0 + 0.08 * np.sin(2 * np.pi * t / 23.0 + self._light_phase) + rng.normal(0, 0.01)
        gray *= gain * self._vignette
        image = gray[:, :, None] * self._tint[None, None, :]
        image += rng.normal(0, self._noise_sigma, image.shape).astype(np.float32)
        return SyntheticFrame(index, np.clip(image, 0, 255).astype(np.uint8), mask)


def _pt(p: np.ndarray) -> tuple[int, int]:
    return int(round(p[0])), int(round(p[1]))


def _paste(gray: np.ndarray, mask: np.ndarray, part: _Part, cx: int, cy: int) -> None:
    """Paste a part patch centred at (cx, cy), clipped to the frame."""
    half = part.patch.shape[0] // 2
    x0, y0 = cx - half, cy - half
    fx0, fy0 = max(0, x0), max(0, y0)
    fx1, fy1 = min(gray.shape[1], x0 + part.patch.shape[1]), min(gray.shape[0], y0 + part.patch.shape[0])
    if fx1 <= fx0 or fy1 <= fy0:
        return
    px, py = slice(fx0 - x0, fx1 - x0), slice(fy0 - y0, fy1 - y0)
    alpha = part.alpha[py, px]
    region = gray[fy0:fy1, fx0:fx1]
    region[alpha] = part.patch[py, px][alpha]
    mask[fy0:fy1, fx0:fx1] |= part.defect[py, px]


def make_dataset(
    seed: int,
    count: int,
    width: int = 320,
    height: int = 240,
    defect_rate: float = 0.15,
    stride: int = 13,
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` frames of one camera, every ``stride``-th, as (images[N,H,W,3], masks[N,H,W])."""
    camera = SyntheticCamera(seed, width=width, height=height, defect_rate=defect_rate)
    frames = [camera.frame(i * stride) for i in range(count)]
    images = np.stack([f.image for f in frames]) if frames else np.zeros((0, height, width, 3), np.uint8)
    masks = np.stack([f.mask for f in frames]) if frames else np.zeros((0, height, width), np.uint8)
    return images, masks


# ---------------------------------------------------------------- pump

CHANNELS = (
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "VolumeFlowRateRMS",
)
ANOMALY_KINDS = ("spike", "drift", "shift", "vibration")
# White sensor noise per channel, in channel units.
_SIGMA = np.array([0.004, 0.005, 0.015, 0.008, 0.05, 0.03, 0.4, 0.25], dtype=np.float64)
_CHUNK = 1024  # noise is drawn in chunks keyed on (seed, chunk): O(1) access to any index
_BLOCK = 240  # at most one anomaly episode per block of samples


@dataclass(frozen=True)
class PumpEpisode:
    start: int
    length: int
    kind: str
    channels: tuple[int, ...]
    magnitude: float  # in units of the channel noise sigma (variance factor for vibration)
    sign: float
    spikes: tuple[int, ...] = ()


class SyntheticPump:
    """A deterministic water pump: ``sample(i)`` and ``generate(n, start)`` depend only on seed and index.

    Every signal is a closed-form function of time (a sum of slow sinusoids for the load, their
    exact first-order-lag responses for the temperatures) plus white noise drawn in seeded chunks,
    so any index is computed without replaying the past. Anomaly episodes are placed at most one
    per block of 240 samples, so ``anomaly_rate`` (the expected fraction of anomalous samples) is
    honoured up to about 0.1; ``anomaly_rate=0`` gives purely normal data.
    """

    channels = CHANNELS

    def __init__(self, seed: int, rate_hz: float = 1.0, anomaly_rate: float = 0.01) -> None:
        if rate_hz <= 0 or not 0 <= anomaly_rate <= 1:
            raise ValueError("pump needs rate_hz > 0 and 0 <= anomaly_rate <= 1")
        self.seed, self.rate_hz, self.anomaly_rate = seed, rate_hz, anomaly_rate
        rng = _rng(seed, _PUMP_SHAPE)
        self._omega = 2 * np.pi / np.array([rng.uniform(300, 900), rng.uniform(90, 240), rng.uniform(40, 80)])
        self._amp = np.array([0.2, 0.08, 0.04]) * rng.uniform(0.8, 1.2, 3)
        self._phase = rng.uniform(0, 2 * np.pi, 3)
        self._mains = (2 * np.pi / rng.uniform(500, 1500), rng.uniform(0, 2 * np.pi))
        self._episodes = functools.lru_cache(maxsize=4096)(self._make_episode)

    def sample(self, index: int) -> tuple[np.ndarray, bool]:
        values, labels = self.generate(1, start=index)
        return values[0], bool(labels[0])

    def generate(self, n: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Samples ``start .. start+n-1`` as (values[n, 8] float32, labels[n] bool)."""
        if start < 0 or n < 0:
            raise ValueError("start and n must be >= 0")
        index = np.arange(start, start + n)
        noise = self._noise(index, _PUMP_NOISE)
        noise[:, 1] = 0.6 * noise[:, 0] + 0.8 * noise[:, 1]  # both accelerometers feel the same shaft
        values = self._normal(index) + noise * _SIGMA
        labels = np.zeros(n, dtype=bool)
        if n and self.anomaly_rate > 0:
            self._inject(index, values, labels)
        return values.astype(np.float32), labels

    def episodes(self, n: int, start: int = 0) -> list[PumpEpisode]:
        """The anomaly episodes that overlap samples ``start .. start+n-1``."""
        out = []
        for block in range(start // _BLOCK, (start + max(n, 1) - 1) // _BLOCK + 1):
            ep = self._episodes(block)
            if ep is not None and ep.start < start + n and ep.start + ep.length > start:
                out.append(ep)
        return out

    # -- normal behaviour

    def _load(self, t: np.ndarray, tau: float = 0.0) -> np.ndarray:
        """Load in [0, 1]-ish, optionally through a first-order lag of time constant ``tau`` (exact)."""
        wt = self._omega[None, :] * t[:, None]
        gain = 1.0 / np.sqrt(1.0 + (self._omega * tau) ** 2)
        lag = np.arctan(self._omega * tau)
        return 0.6 + (self._amp * gain * np.sin(wt + self._phase - lag)).sum(axis=1)

    def _normal(self, index: np.ndarray) -> np.ndarray:
        t = index / self.rate_hz
        load = self._load(t)
        mains = np.sin(self._mains[0] * t + self._mains[1])
        out = np.empty((len(index), 8), dtype=np.float64)
        out[:, 0] = 0.20 + 0.05 * load
        out[:, 1] = 0.26 + 0.06 * load
        out[:, 2] = 1.2 + 1.0 * load
        out[:, 3] = 0.1 + 0.5 * load**2
        out[:, 4] = 62.0 + 15.0 * self._load(t, tau=120.0)
        out[:, 5] = 23.0 + 5.0 * self._load(t, tau=300.0)
        out[:, 6] = 229.0 + 1.5 * mains - 3.0 * (load - 0.6)
        out[:, 7] = 18.0 + 16.0 * load
        return out

    def _noise(self, index: np.ndarray, tag: int) -> np.ndarray:
        out = np.empty((len(index), 8), dtype=np.float64)
        chunks = index // _CHUNK
        for chunk in np.unique(chunks):
            rows = chunks == chunk
            table = _rng(self.seed, tag, int(chunk)).standard_normal((_CHUNK, 8))
            out[rows] = table[index[rows] % _CHUNK]
        return out

    # -- anomalies

    def _make_episode(self, block: int) -> PumpEpisode | None:
        rng = _rng(self.seed, _EPISODE, block)
        kind = ANOMALY_KINDS[int(rng.integers(len(ANOMALY_KINDS)))]
        length = int({"spike": rng.integers(3, 10), "drift": rng.integers(15, 60)}.get(kind, rng.integers(10, 50)))
        mean_length = 27.0
        if rng.random() >= min(1.0, self.anomaly_rate * _BLOCK / mean_length):
            return None
        start = block * _BLOCK + int(rng.integers(10, _BLOCK - length - 10))
        if kind == "vibration":
            channels, magnitude = (0, 1), float(rng.uniform(4, 7))
        else:
            count = int(rng.integers(1, 4))
            channels = tuple(sorted(int(c) for c in rng.choice(8, size=count, replace=False)))
            magnitude = float({"spike": rng.uniform(8, 15), "drift": rng.uniform(8, 14)}.get(kind, rng.uniform(5, 9)))
        spikes = ()
        if kind == "spike":
            spikes = tuple(sorted({0, *(int(s) for s in rng.integers(0, length, size=2))}))
        sign = 1.0 if rng.random() < 0.5 else -1.0
        return PumpEpisode(start, length, kind, channels, magnitude, sign, spikes)

    def _inject(self, index: np.ndarray, values: np.ndarray, labels: np.ndarray) -> None:
        start = int(index[0])
        vib = None
        for ep in self.episodes(len(index), start):
            k = np.arange(max(ep.start, start), min(ep.start + ep.length, start + len(index)))
            rows, pos = k - start, k - ep.start
            labels[rows] = True
            cols = list(ep.channels)
            sigma = _SIGMA[cols]
            if ep.kind == "shift":
                values[np.ix_(rows, cols)] += ep.sign * ep.magnitude * sigma
            elif ep.kind == "drift":
                ramp = ((pos + 1) / ep.length)[:, None]
                values[np.ix_(rows, cols)] += ep.sign * ep.magnitude * ramp * sigma
            elif ep.kind == "spike":
                hit = np.isin(pos, ep.spikes)
                values[np.ix_(rows[hit], cols)] += ep.sign * ep.magnitude * sigma
            else:
                vib = self._noise(index, _PUMP_VIB) if vib is None else vib
                extra = np.sqrt(ep.magnitude**2 - 1.0) * vib[np.ix_(rows, cols)] * sigma
                values[np.ix_(rows, cols)] += extra


def pump_dataset(seed: int, n: int, anomaly_rate: float = 0.0, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples of one pump as (values[n, 8], labels[n]); ``anomaly_rate=0`` is purely normal."""
    return SyntheticPump(seed, anomaly_rate=anomaly_rate).generate(n, start)
