"""ONNX Runtime side of the vision models: one session per model package, batched inference.

A :class:`SegmentationModel` owns one ``onnxruntime.InferenceSession`` for one package. It
turns camera frames (BGR or gray, any size) into the model's input as the manifest says
(gray, resize or keep the frame's own size, scale/mean/std), runs a batch in one ``session.run``
(a ``native`` package: one per group of frames of the same padded size), and returns each frame's
defect probability map at that frame's size. No torch here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from models.package import Package, SegmentationPreprocess

log = logging.getLogger(__name__)

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


class ModelLoadError(RuntimeError):
    """The package cannot be run here (wrong task, bad graph, no provider)."""


def resolve_providers(requested: Sequence[str]) -> list[str]:
    """Map short names (tensorrt, cuda, cpu) to available ORT providers, in order; CPU always last."""
    available = set(ort.get_available_providers())
    chosen: list[str] = []
    for name in requested:
        provider = PROVIDERS.get(name.lower(), name)
        if provider not in available:
            log.warning("execution provider %s not available here (have %s); skipping it", name, sorted(available))
        elif provider not in chosen:
            chosen.append(provider)
    if "CPUExecutionProvider" not in chosen:
        if not chosen:
            log.warning("no requested execution provider available (%s); falling back to CPU", list(requested))
        chosen.append("CPUExecutionProvider")
    return chosen


def tensorrt_options(precision: str, cache_dir: Path) -> dict[str, str]:
    """TensorRT settings for a package: engines and timing caches on disk (the first load on a
    Jetson builds the engine for minutes; later loads read it back), and the precision the
    package was made for (int8 packages are QDQ graphs, which TensorRT takes as they are)."""
    return {
        "trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache_dir),
        "trt_fp16_enable": str(precision in ("fp16", "int8")), "trt_int8_enable": str(precision == "int8"),
    }


def trt_cache_dir() -> Path:
    return Path(os.environ.get("EDGELINE_TRT_CACHE", Path.home() / ".cache" / "edgeline" / "tensorrt"))


def create_session(package: Package, providers: Sequence[str] = ("cpu",), threads: int = 1) -> ort.InferenceSession:
    chosen: list[str | tuple[str, dict[str, str]]] = list(resolve_providers(providers))
    if PROVIDERS["tensorrt"] in chosen:
        cache = trt_cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        chosen[chosen.index(PROVIDERS["tensorrt"])] = (PROVIDERS["tensorrt"],
                                                        tensorrt_options(package.manifest.precision, cache))
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(str(package.model_path), options, providers=chosen)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelLoadError(f"{package.ref}: cannot create session: {exc}") from exc
    log.info("model %s loaded on %s with %d thread(s)", package.ref, session.get_providers()[0], threads)
    return session


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


class PackagedModel:
    """What every loaded model shows: its package, name, version and the providers it runs on."""

    package: Package
    session: ort.InferenceSession

    @property
    def name(self) -> str:
        return self.package.manifest.name

    @property
    def version(self) -> str:
        return self.package.manifest.version

    @property
    def package_id(self) -> str:
        return self.package.manifest.package_id

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()


class SegmentationModel(PackagedModel):
    """A segmentation package in one ONNX Runtime session; ``infer`` returns probability maps."""

    def __init__(self, package: Package, providers: Sequence[str] = ("cpu",), threads: int = 1) -> None:
        manifest = package.manifest
        if manifest.task != "segmentation" or not isinstance(manifest.preprocess, SegmentationPreprocess):
            raise ModelLoadError(f"{package.ref}: task is {manifest.task!r}, not segmentation")
        self.package = package
        self.spec = manifest.preprocess
        self.postprocess = manifest.postprocess
        self.session = create_session(package, providers, threads)
        self._input = self.session.get_inputs()[0].name
        if self.spec.resize == "native" and any(isinstance(d, int) for d in self.session.get_inputs()[0].shape[2:]):
            # the warm-up below runs at the reference size only: such a graph would fail later, on
            # the first camera of another size
            raise ModelLoadError(f"{package.ref}: a native package needs a graph with dynamic height and width, "
                                 f"this one takes {self.session.get_inputs()[0].shape}")
        try:
            self.infer([np.zeros((self.spec.height, self.spec.width), np.uint8)])  # warm-up
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's errors derive from Exception only
            raise ModelLoadError(f"{package.ref}: warm-up inference failed: {exc}") from None


    def infer(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Defect probability map (float32, frame H×W) for each frame: one ``session.run`` for the
        whole batch (``fixed``), or one per group of frames of the same padded size (``native``)."""
        if not images:
            return []
        inputs = [preprocess_frame(image, self.spec) for image in images]
        if self.spec.resize == "fixed":
            (probs,) = self.session.run(None, {self._input: np.stack(inputs)})[:1]
            return [self._to_frame(prob[-1], image.shape[:2]) for prob, image in zip(probs, images)]
        out: list[np.ndarray] = [np.empty(0, np.float32)] * len(images)
        for size, indexes in native_buckets(inputs, self.spec.pad_multiple).items():
            batch = np.stack([pad_input(inputs[i], size) for i in indexes])
            (probs,) = self.session.run(None, {self._input: batch})[:1]
            for i, prob in zip(indexes, probs):
                h, w = inputs[i].shape[1:]
                out[i] = self._to_frame(prob[-1, :h, :w], images[i].shape[:2])
        return out

    def _to_frame(self, prob: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        prob = prob.astype(np.float32, copy=False)
        if prob.shape != size:
            prob = cv2.resize(prob, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        return prob
