"""Does micro-batching pay? The edge's seg model frame by frame (baseline) vs. batches of 2/4/8 frames.

    python -m bench.inference [--seconds 3] [--threads 1] [--package seg-synth-int8] [--sizes 320x240]

Synthetic frames through :class:`models.package.session.SegmentationModel` (preprocessing, one
``session.run`` per batch, resize back) and the region post-processing, on the CPU. Reports
frames/s and per-frame latency for each batch size, and the speed-up over batch 1 measured in
the same run. ``--sizes`` gives the cameras' resolutions (``WxH``, comma-separated); a batch takes
one frame of each camera in turn, as the agent's micro-batches do. A ``native`` package runs one
``session.run`` per frame size in a batch, so with mixed sizes a batch only pays within a size.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import typer

from bench.report import report
from models.package import BUILTIN_PACKAGES, SegmentationModel, SyntheticCamera, load_package, regions_from_probabilities


def frames_per_second(model: SegmentationModel, frames: list[np.ndarray], batch: int, seconds: float) -> float:
    post = model.postprocess
    done, index = 0, 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        chunk = [frames[(index + k) % len(frames)] for k in range(batch)]
        for prob in model.infer(chunk):
            regions_from_probabilities(prob, post.threshold, post.min_area)
        done += batch
        index += batch
    return done / (time.perf_counter() - started)


def camera_frames(sizes: list[tuple[int, int]], count: int = 32) -> list[np.ndarray]:
    """``count`` frames, the cameras of ``sizes`` (width, height) taking turns."""
    cameras = [SyntheticCamera(seed=1 + i, width=w, height=h, defect_rate=0.3) for i, (w, h) in enumerate(sizes)]
    return [cameras[i % len(cameras)].frame(i // len(cameras)).image for i in range(count)]


def main(seconds: float = 3.0, threads: int = 1, package: str = "seg-synth-int8", sizes: str = "320x240",
         out: Path | None = None) -> None:
    """``package``: a built-in package's name, or the path of a package folder or tar."""
    path = Path(package)
    model = SegmentationModel(load_package(path if path.exists() else BUILTIN_PACKAGES / package), threads=threads)
    resolutions = [(int(w), int(h)) for w, h in (size.lower().split("x") for size in sizes.split(","))]
    frames = camera_frames(resolutions)
    baseline = frames_per_second(model, frames, 1, seconds)
    rows = [{"batch": 1, "frames_per_s": baseline, "ms_per_frame": 1000 / baseline, "speedup_vs_batch1": 1.0}]
    for batch in (2, 4, 8):
        fps = frames_per_second(model, frames, batch, seconds)
        rows.append({"batch": batch, "frames_per_s": fps, "ms_per_frame": 1000 / fps,
                     "speedup_vs_batch1": fps / baseline})
    report("inference", f"{model.package_id} ({model.spec.resize} input): {sizes} frames, CPU, {threads} intra-op "
           "thread(s)", rows, notes="speed-up is against batch 1 measured in this same run", out=out)


if __name__ == "__main__":
    typer.run(main)
