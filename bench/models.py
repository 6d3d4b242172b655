"""What do the packaged models cost on this machine? Segmentation per frame at batch 1 and 4:
torch eager fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8 (U8S8 and S8S8), with achieved
GFLOP/s and the share of a float32 matmul peak measured in the same run; plus the streaming
LSTM rows of :func:`bench.lstm.lstm_rows` where that module is present. One run, one JSON.

    python -m bench.models [--seconds 2] [--threads 2]

fp16 rows appear only where ONNX Runtime has the CUDA provider (the fp16 package targets
CUDA/TensorRT; the CPU provider runs fp16 convs, if at all, by casting).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import onnxruntime as ort
import typer

from bench.report import print_rows, report
from edgeline.config import BUILTIN_PACKAGES
from models.package import load_package

SEG = "seg-tiles"


def per_call_seconds(fn: Callable[[], Any], seconds: float, min_calls: int = 3) -> float:
    """Median wall time of ``fn`` after one warm-up call, for about ``seconds``."""
    fn()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < min_calls:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def matmul_peak_gflops(seconds: float, threads: int) -> dict[str, float]:
    """float32 matmul GFLOP/s of numpy (BLAS) and, if present, torch, at n=1024."""
    n = 1024
    a = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)
    b = np.random.default_rng(1).normal(size=(n, n)).astype(np.float32)
    out = {"numpy": 2 * n**3 / per_call_seconds(lambda: a @ b, seconds) / 1e9}
    try:
        import torch

        torch.set_num_threads(threads)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        out["torch"] = 2 * n**3 / per_call_seconds(lambda: ta @ tb, seconds) / 1e9
    except ImportError:
        pass
    return out


def _session(model: bytes | str, threads: int, providers: list[str] | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model, options, providers=providers or ["CPUExecutionProvider"])


def _ort_runner(sess: ort.InferenceSession, x: np.ndarray) -> Callable[[], Any]:
    name = sess.get_inputs()[0].name
    return lambda: sess.run(None, {name: x})


def _requantize(fp32_path: Path, size: int, act: str, work: Path) -> bytes:
    """int8 QDQ of the fp32 graph with the given activation type, MinMax-calibrated on a few
    synthetic frames: for timing only (scales do not change the kernels that run)."""
    from edge.inference import preprocess_frame
    from edge.synthetic import make_dataset
    from models.quantize import quantize_int8

    spec = load_package(fp32_path.parent).manifest.preprocess
    images, _ = make_dataset(3, 8, defect_rate=0.5)
    frames = np.stack([preprocess_frame(im, spec) for im in images]).astype(np.float32)
    return quantize_int8(fp32_path, frames, "minmax", act, work)


def seg_rows(seconds: float, threads: int, packages: Path = BUILTIN_PACKAGES) -> tuple[list[dict], str]:
    fp32 = load_package(packages / f"{SEG}-fp32")
    size = fp32.manifest.preprocess.height
    gflop = fp32.manifest.metrics.get("gflops", float("nan"))
    peak = matmul_peak_gflops(min(seconds, 1.0), threads)
    best = max(peak.values())
    variants: list[tuple[str, Callable[[int], Callable[[], Any]]]] = []
    notes = [f"matmul fp32 peak (n=1024, {threads} threads): " + ", ".join(f"{k} {v:.1f}" for k, v in peak.items())
             + " GFLOP/s", f"{SEG}: {gflop:.3f} GFLOP per {size}x{size} frame"]
    try:
        import torch

        from models.segmentation import TileUNet

        torch.set_num_threads(threads)
        model = TileUNet().eval()

        def torch_runner(batch: int) -> Callable[[], Any]:
            x = torch.zeros(batch, 1, size, size)

            def run() -> None:
                with torch.inference_mode():
                    model(x)
            return run
        variants.append(("torch eager fp32", torch_runner))
        notes.append("torch eager: same architecture, random weights, BN unfused (timing only)")
    except ImportError:
        notes.append("torch eager: skipped (torch not installed)")
    work = Path(tempfile.mkdtemp(prefix="bench-models-"))
    sessions = {"ORT fp32": _session(str(fp32.model_path), threads)}
    int8_dir = packages / f"{SEG}-int8"
    if int8_dir.exists():
        sessions["ORT int8 (package)"] = _session(str(load_package(int8_dir).model_path), threads)
    for act in ("u8s8", "s8s8"):
        sessions[f"ORT int8 {act.upper()}"] = _session(_requantize(fp32.model_path, size, act, work), threads)
    fp16_dir = packages / f"{SEG}-fp16"
    if "CUDAExecutionProvider" in ort.get_available_providers() and fp16_dir.exists():
        sessions["ORT CUDA fp16"] = _session(str(load_package(fp16_dir).model_path), threads,
                                             ["CUDAExecutionProvider", "CPUExecutionProvider"])
        sessions["ORT CUDA fp32"] = _session(str(fp32.model_path), threads,
                                             ["CUDAExecutionProvider", "CPUExecutionProvider"])
    else:
        notes.append("fp16: no rows, no CUDA provider here (the fp16 package targets CUDA/TensorRT)")
    for label, sess in sessions.items():
        variants.append((label, lambda batch, s=sess: _ort_runner(
            s, np.random.default_rng(0).normal(0, 1, (batch, 1, size, size)).astype(np.float32))))
    rows = []
    for batch in (1, 4):
        for label, make in variants:
            ms = 1000 * per_call_seconds(make(batch), seconds) / batch
            achieved = gflop / (ms / 1000)
            rows.append({"model": SEG, "runtime": label, "batch": batch, "ms_per_frame": ms,
                         "frames_per_s": 1000 / ms, "gflop_per_s": achieved, "pct_of_matmul_peak": 100 * achieved / best})
    return rows, "\n".join(notes)


def main(seconds: float = 2.0, threads: int = 2, packages: Path = BUILTIN_PACKAGES,
         out: Optional[Path] = None) -> None:
    rows, notes = seg_rows(seconds, threads, packages)
    try:
        from bench.lstm import lstm_rows
    except ImportError as exc:
        lstm, lstm_note = [], f"LSTM rows: bench.lstm not importable here ({exc})"
    else:
        lstm, lstm_note = lstm_rows(seconds), "LSTM rows: bench.lstm.lstm_rows"
    path = report("models", f"{SEG}: per-frame latency, CPU, {threads} intra-op thread(s)", rows,
                  notes=notes + "\n" + lstm_note, out=out)
    if lstm:
        print_rows("streaming LSTM (bench.lstm)", lstm)
    result = json.loads(path.read_text())
    result["lstm_rows"] = lstm
    path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    typer.run(main)
