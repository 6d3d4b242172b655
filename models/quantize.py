"""fp32 seg package -> int8 (static QDQ) and fp16 packages, with a quality gate. No torch.

int8: ``onnxruntime.quantization.quantize_static`` in QDQ format (what TensorRT also takes),
per-channel int8 weights, calibrated on preprocessed TRAIN frames of the model's own dataset. The
calibration method (MinMax / Entropy / Percentile) is chosen by val IoU; the activation type
(uint8 "U8S8" vs int8 "S8S8") by measured latency on this machine. The chosen model is then
evaluated through the edge runtime exactly like the fp32 one, and an int8 package is written
only if its val defect IoU is within ``max_iou_drop`` of fp32's; otherwise
:class:`QualityGateError` names both numbers and nothing is written.

fp16: ``onnxconverter_common.float16.convert_float_to_float16(keep_io_types=True)`` for
CUDA/TensorRT; checked to load (and, where the CPU provider runs it, to agree) in ORT.

Native packages (``preprocess.resize == "native"``, frames of many sizes): every frame is fed
alone (a batch of one), mirror-padded to the package's ``pad_multiple`` exactly as the edge pads
it (:func:`models.package.preprocess.pad_input`); quick IoUs crop each map back to its frame; latencies are
measured at the reference frame (the manifest's height x width, padded). Fixed packages keep
stacked [N,1,h,w] arrays.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from models import tiles
from models.package import (Manifest, Package, input_size, pad_input, padded_size, preprocess_frame, reference_input,
                            write_package)

log = logging.getLogger(__name__)

METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}
ACTIVATIONS = {"u8s8": QuantType.QUInt8, "s8s8": QuantType.QInt8}


class QualityGateError(RuntimeError):
    """The quantized model lost more val IoU than the gate allows."""

    def __init__(self, fp32_iou: float, quant_iou: float, max_drop: float, precision: str = "int8") -> None:
        self.fp32_iou, self.quant_iou, self.max_drop = fp32_iou, quant_iou, max_drop
        super().__init__(
            f"{precision} quality gate failed: val defect IoU {quant_iou:.4f} vs fp32 {fp32_iou:.4f} "
            f"(drop {fp32_iou - quant_iou:+.4f} > allowed {max_drop:.4f}); no {precision} package written"
        )


Frames = np.ndarray | list[np.ndarray]
"""Model inputs: stacked [N,1,h,w] (a fixed package), or a list of [1,H,W] frames, each padded to
its own multiple of ``pad_multiple`` (a native one)."""


class FrameReader(CalibrationDataReader):
    """Feeds preprocessed frames (:data:`Frames`) one at a time, as batches of one, to the calibrator."""

    def __init__(self, frames: Frames, input_name: str = "image") -> None:
        self.frames, self.input_name, self.index = frames, input_name, 0

    def get_next(self):
        if self.index >= len(self.frames):
            return None
        self.index += 1
        return {self.input_name: np.ascontiguousarray(self.frames[self.index - 1], np.float32)[None]}

    def rewind(self) -> None:
        self.index = 0


def native(manifest: Manifest) -> bool:
    return getattr(manifest.preprocess, "resize", "fixed") == "native"


def model_inputs(manifest: Manifest, images: list[np.ndarray]) -> Frames:
    """Frames as the edge runtime feeds them: stacked [N,1,h,w] (fixed), or each [1,H,W] mirror-padded
    to its own multiple of ``pad_multiple`` (native)."""
    spec = manifest.preprocess
    xs = [preprocess_frame(image, spec).astype(np.float32) for image in images]
    if native(manifest):
        return [pad_input(x, padded_size(x.shape[1:], spec.pad_multiple)) for x in xs]
    return np.stack(xs)


def calibration_picks(classes: list[str], count: int, seed: int = 0) -> list[int]:
    """Indexes of ``count`` frames among ``classes``, half with defects and half clean where the
    set allows (the same picks whatever the images are, so callers may load only these)."""
    rng = np.random.default_rng(seed + 7)
    defect = [i for i, c in enumerate(classes) if c != tiles.FREE]
    free = [i for i, c in enumerate(classes) if c == tiles.FREE]
    picks = [defect[i] for i in rng.permutation(len(defect))[: (count + 1) // 2]]
    return picks + [free[i] for i in rng.permutation(len(free))[: count - len(picks)]]


def calibration_frames(package: Package, train: tiles.ImageSet, count: int, seed: int = 0) -> np.ndarray:
    """``count`` preprocessed TRAIN frames (:func:`calibration_picks`; never val frames), stacked
    [N,1,H,W]: native frames mirror-padded to the largest among them."""
    picks = calibration_picks(train.classes, count, seed)
    frames = model_inputs(package.manifest, [train.images[i] for i in picks])
    if isinstance(frames, list) and frames:  # native: one shape for all, as ORT's histogram calibrators need
        common = (max(x.shape[1] for x in frames), max(x.shape[2] for x in frames))
        return np.stack([pad_input(x, common) for x in frames])
    return frames


def val_arrays(package: Package, val: tiles.ImageSet) -> tuple[Frames, np.ndarray | list[np.ndarray]]:
    """Val inputs (:func:`model_inputs`) and binary masks at model input size (unpadded), for quick
    comparisons of variants."""
    import cv2

    manifest = package.manifest
    xs = model_inputs(manifest, val.images)
    if native(manifest):
        sizes = [input_size(image.shape[:2], manifest.preprocess) for image in val.images]
        return xs, [cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA) > 0.5
                    for mask, (h, w) in zip(val.masks, sizes)]
    spec = manifest.preprocess
    ys = [cv2.resize(mask.astype(np.float32), (spec.width, spec.height), interpolation=cv2.INTER_AREA) > 0.5
          for mask in val.masks]
    return xs, np.stack(ys)


def session(onnx_model: bytes | str, threads: int = 2) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])


def run_probs(sess: ort.InferenceSession, x: Frames, batch: int = 8) -> np.ndarray | list[np.ndarray]:
    """Probability maps [N,h,w] of stacked inputs, ``batch`` at a time; or, for a list of frames,
    a list of maps, each frame alone."""
    name = sess.get_inputs()[0].name
    if isinstance(x, list):
        return [sess.run(None, {name: xi[None]})[0][0, 0] for xi in x]
    return np.concatenate([sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])[:, 0]


def cropped(probs: np.ndarray | list[np.ndarray], ys: np.ndarray | list[np.ndarray]) -> list[np.ndarray]:
    """Each map cut back to its mask's size (the padding of a native frame dropped)."""
    return [p[: y.shape[0], : y.shape[1]] for p, y in zip(probs, ys)]


def quick_iou(sess: ort.InferenceSession, x: Frames, y: np.ndarray | list[np.ndarray], threshold: float) -> float:
    inter = union = 0.0
    for prob, truth in zip(cropped(run_probs(sess, x), y), y):
        pred = prob > threshold
        inter, union = inter + float((pred & truth).sum()), union + float((pred | truth).sum())
    return inter / union if union else 1.0


def latency_ms(onnx_model: bytes | str, size: int | tuple[int, int], batch: int, threads: int = 2,
               seconds: float = 1.5) -> float:
    """Median wall time per frame of ``session.run`` at ``batch`` on this CPU, on inputs of
    ``size`` (a side, or (height, width))."""
    sess = session(onnx_model, threads)
    height, width = (size, size) if isinstance(size, int) else size
    x = np.random.default_rng(0).normal(0, 1, (batch, 1, height, width)).astype(np.float32)
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x})
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 3:
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times)) / batch


def quantize_int8(fp32_path: Path, frames: Frames, method: str, activations: str, work: Path) -> bytes:
    """Static QDQ quantization of ``fp32_path`` (after ORT's quant pre-processing), all but the
    input layer (the first conv, one gray channel in), which stays fp32. seg-tiles, whole val split
    through the edge runtime, 16 MinMax frames, onnxruntime 1.32: val IoU 0.568 with it fp32,
    0.565 with it quantized too, fp32 0.561."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepped = work / "prepped.onnx"
    if not prepped.exists():
        quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=True)
    out = work / f"int8-{method}-{activations}.onnx"
    quantize_static(
        str(prepped), str(out), FrameReader(frames),
        quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=ACTIVATIONS[activations], weight_type=QuantType.QInt8,
        calibrate_method=METHODS[method], nodes_to_exclude=input_layer_nodes(prepped),
        extra_options={"ActivationSymmetric": activations == "s8s8"},
    )
    return out.read_bytes()


def input_layer_nodes(model_path: Path) -> list[str]:
    """Names of the nodes that read a graph input directly (the first conv)."""
    graph = onnx.load(str(model_path)).graph
    inputs = {i.name for i in graph.input} - {t.name for t in graph.initializer}
    return [node.name for node in graph.node if inputs.intersection(node.input)]


def convert_fp16(fp32_path: Path) -> bytes:
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    return model.SerializeToString()


def quantize_packages(
    fp32: Package, out_dir: Path, max_iou_drop: float = 0.01, calib_frames: int = 64, threads: int = 2,
    root: Path | None = None, val_fraction: float = 0.2, max_false_alarms: float = 0.05, seed: int = 0,
    methods: tuple[str, ...] = tuple(METHODS), activations: tuple[str, ...] = tuple(ACTIVATIONS),
    fp16: bool = True, fp32_metrics: dict[str, float] | None = None,
    data: tuple[tiles.ImageSet, tiles.ImageSet] | None = None,
) -> dict[str, Package]:
    """int8 (gated) and fp16 packages from an fp32 package; returns ``{"int8": ..., "fp16": ...}``.

    ``fp32_metrics``: the fp32 package's metrics on this same split (from its build); when not
    given, fp32 is evaluated here, so both sides of the gate always see the same images.
    ``data``: the (train, val) sets the fp32 model was built on; default: the magnetic-tile split.
    Raises :class:`QualityGateError` before writing anything when int8 misses the gate."""
    out_dir = Path(out_dir)
    train, val = data if data is not None else tiles.load_dataset("tiles", val_fraction, root)
    with_synthetic = tiles.SYNTHETIC not in val.classes
    base = dict(fp32.manifest.metrics) | (fp32_metrics if fp32_metrics is not None else tiles.evaluate_package(
        fp32, train, val, threads, max_false_alarms, with_synthetic))
    manifest = fp32.manifest
    size, threshold = reference_input(manifest.preprocess), manifest.postprocess.threshold
    frames = calibration_frames(fp32, train, calib_frames, seed)
    x_val, y_val = val_arrays(fp32, val)
    fp32_quick = quick_iou(session(str(fp32.model_path), threads), x_val, y_val, threshold)
    packages: dict[str, Package] = {}
    with tempfile.TemporaryDirectory(prefix="seg-quant-") as tmp:
        work = Path(tmp)
        # 1. calibration method by val IoU (activations uint8, the usual x86 choice)
        first_act = activations[0]
        candidates: dict[tuple[str, str], bytes] = {}
        scores: dict[str, float] = {}
        for method in methods:
            t0 = time.perf_counter()
            candidates[(method, first_act)] = quantize_int8(fp32.model_path, frames, method, first_act, work)
            scores[method] = quick_iou(session(candidates[(method, first_act)], threads), x_val, y_val, threshold)
            log.info("int8 %s/%s: quick val IoU %.4f (fp32 %.4f), %.1f s", method, first_act, scores[method],
                     fp32_quick, time.perf_counter() - t0)
        method = max(scores, key=scores.get)
        # 2. activation type by latency on this machine
        lat: dict[str, dict[int, float]] = {}
        act_iou: dict[str, float] = {}
        for act in activations:
            if (method, act) not in candidates:
                candidates[(method, act)] = quantize_int8(fp32.model_path, frames, method, act, work)
            onnx_bytes = candidates[(method, act)]
            act_iou[act] = quick_iou(session(onnx_bytes, threads), x_val, y_val, threshold)
            lat[act] = {b: latency_ms(onnx_bytes, size, b, threads) for b in (1, 4)}
            log.info("int8 %s/%s: %.2f ms/frame at batch 1, %.2f at batch 4, quick IoU %.4f", method, act,
                     lat[act][1], lat[act][4], act_iou[act])
        ok = [a for a in activations if fp32_quick - act_iou[a] <= max_iou_drop] or list(activations)
        act = min(ok, key=lambda a: lat[a][1])
        int8_bytes = candidates[(method, act)]
        # 3. the gate, on the same edge-runtime evaluation as fp32
        trial = write_package(work / "int8", manifest.model_copy(update={"precision": "int8", "metrics": {}}),
                              int8_bytes)
        int8_metrics = tiles.evaluate_package(trial, train, val, threads, max_false_alarms, with_synthetic)
        drop = base["iou"] - int8_metrics["iou"]
        log.info("int8 gate: val IoU %.4f vs fp32 %.4f (drop %.4f, allowed %.4f)", int8_metrics["iou"], base["iou"],
                 drop, max_iou_drop)
        if drop > max_iou_drop:
            raise QualityGateError(base["iou"], int8_metrics["iou"], max_iou_drop)
        keep = ("params", "gflops")
        metrics = {k: base[k] for k in keep if k in base} | int8_metrics | {
            "iou_drop_vs_fp32": drop, "fp32_iou": base["iou"], "max_iou_drop": max_iou_drop,
            **{f"calib_{m}_quick_iou": v for m, v in scores.items()},
            f"calib_{method}_chosen": 1.0, f"activations_{act}_chosen": 1.0,
            "calib_frames": float(len(frames)), "fp32_input_layer": 1.0,
        }
        bench = {f"ms_per_frame_batch{b}": lat[act][b] for b in (1, 4)}
        bench |= {f"{a}_ms_per_frame_batch{b}": lat[a][b] for a in lat for b in (1, 4)}
        bench |= {"fp32_ms_per_frame_batch1": latency_ms(str(fp32.model_path), size, 1, threads),
                  "threads": float(threads)}
        int8_manifest = tiles.with_alarm(
            manifest.model_copy(update={"precision": "int8", "metrics": metrics, "bench": bench}), int8_metrics)
        fp16_bytes = convert_fp16(fp32.model_path) if fp16 else None
        packages["int8"] = write_package(out_dir / f"{manifest.name}-int8", int8_manifest, int8_bytes)
    if fp16_bytes is not None:
        packages["fp16"] = write_fp16_package(fp32, fp16_bytes, out_dir, x_val, y_val, base, threads)
    return packages


def write_fp16_package(fp32: Package, fp16_bytes: bytes, out_dir: Path, x_val: Frames,
                       y_val: np.ndarray | list[np.ndarray], base: dict[str, float], threads: int) -> Package:
    """fp16 package; where the CPU provider can run it, its quick val IoU and parity vs fp32."""
    manifest = fp32.manifest
    threshold = manifest.postprocess.threshold
    metrics = {k: base[k] for k in ("params", "gflops") if k in base}
    graph = onnx.load_from_string(fp16_bytes)
    onnx.checker.check_model(graph)
    inits = [t for t in graph.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    metrics["fp16_initializer_share"] = (
        sum(t.data_type == onnx.TensorProto.FLOAT16 for t in inits) / len(inits) if inits else 0.0)
    bench: dict[str, float] = {}
    try:
        sess = session(fp16_bytes, threads)
        ref = np.concatenate([p.ravel() for p in cropped(run_probs(session(str(fp32.model_path), threads),
                                                                          x_val[:16]), y_val[:16])])
        got = np.concatenate([p.ravel() for p in cropped(run_probs(sess, x_val[:16]), y_val[:16])])
        metrics |= {"cpu_runs": 1.0, "parity_max_abs_diff_vs_fp32": float(np.abs(got - ref).max()),
                    "parity_pixel_agreement_vs_fp32": float(((got > threshold) == (ref > threshold)).mean()),
                    "quick_iou_model_res": quick_iou(sess, x_val, y_val, threshold),
                    "fp32_quick_iou_model_res": quick_iou(session(str(fp32.model_path), threads), x_val, y_val,
                                                          threshold)}
        bench["cpu_ms_per_frame_batch1"] = latency_ms(fp16_bytes, reference_input(manifest.preprocess), 1, threads)
    except Exception as exc:  # noqa: BLE001 - the CPU provider may lack fp16 kernels; say so in the manifest
        log.warning("fp16 model does not run on the CPU provider here (%s); checked structurally only", exc)
        metrics["cpu_runs"] = 0.0
    fp16_manifest = manifest.model_copy(update={"precision": "fp16", "metrics": metrics, "bench": bench})
    return write_package(out_dir / f"{manifest.name}-fp16", fp16_manifest, fp16_bytes)
