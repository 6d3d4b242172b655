"""ONNX Runtime side of the models: one session per model package, batched inference.

:func:`create_session` opens a package's ``model.onnx`` on the execution providers asked for
(TensorRT > CUDA > CPU, whichever this machine has); :func:`check_model_graph` refuses a graph
whose inputs and outputs differ from the manifest's. A :class:`SegmentationModel` owns one
``onnxruntime.InferenceSession`` for one package. It turns camera frames (BGR or gray, any size)
into the model's input as the manifest says (:mod:`models.package.preprocess`), runs a batch in one
``session.run`` (a ``native`` package: one per group of frames of the same padded size), and
returns each frame's defect probability map at that frame's size. No torch here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort

from models.package.files import Package
from models.package.manifest import MODEL_FILE, PackageError, SegmentationPreprocess, TensorSpec
from models.package.preprocess import native_buckets, pad_input, preprocess_frame

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


def check_model_graph(package: Package) -> None:
    """Refuse (:class:`PackageError`) a ``model.onnx`` that ONNX Runtime cannot load, or whose graph
    inputs or outputs differ from the manifest's: names in order, element types, ranks and fixed sizes
    (a named, dynamic axis on either side matches any size)."""
    try:
        session = ort.InferenceSession(str(package.model_path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise PackageError(f"{package.ref}: {MODEL_FILE} does not load in ONNX Runtime: {exc}") from None
    problems = (_tensor_problems("input", package.manifest.inputs, session.get_inputs())
                + _tensor_problems("output", package.manifest.outputs, session.get_outputs()))
    if problems:
        raise PackageError(f"{package.ref}: {MODEL_FILE} does not match the manifest: {'; '.join(problems)}")


ONNX_ELEMENT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int8": "tensor(int8)",
                      "uint8": "tensor(uint8)"}


def _tensor_problems(kind: str, specs: list[TensorSpec], graph: list[Any]) -> list[str]:
    """What differs between the manifest's ``specs`` and the graph's tensors (ONNX Runtime NodeArgs)."""
    if [s.name for s in specs] != [t.name for t in graph]:
        return [f"{kind}s are {[t.name for t in graph]} in the graph, {[s.name for s in specs]} in the manifest"]
    problems = []
    for spec, tensor in zip(specs, graph):
        if ONNX_ELEMENT_TYPES[spec.dtype] != tensor.type:
            problems.append(f"{kind} {spec.name!r} is {tensor.type} in the graph, {spec.dtype} in the manifest")
        sizes_differ = any(isinstance(a, int) and isinstance(b, int) and a != b
                           for a, b in zip(spec.shape, tensor.shape))
        if len(spec.shape) != len(tensor.shape) or sizes_differ:
            problems.append(f"{kind} {spec.name!r} has shape {tensor.shape} in the graph, {spec.shape} in the manifest")
    return problems


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
