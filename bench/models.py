"""What do the segmentation models cost, and what do they find? One run, one JSON
(``bench/results/models.json``):

1. Variants (``rows``): one row per model. The first, the reference of the ratios, is the net of
   the previous seg-tiles (1.1.0: 256x256 frames) as int8 (:data:`PREVIOUS`); then the shipped
   ``seg-tiles`` int8, fp32 and fp16 packages (their own graphs at their reference frame, with the
   cross-validated figures of the recipe they record). Then every cross-validated variant found
   under ``bench/results/seg_cv`` (recipes of :mod:`models.seg_cv`, ``+prune<P>``, ``+teacher``,
   ``+distill``, ``+student``, ``+int8`` of :mod:`models.compress`), and candidate student widths
   not covered by one. Columns: GFLOP per frame at the median tile (325x270, padded to 336x272:
   native) or 256x256 (the fixed packages); ms per frame on this CPU at batch 1 with 1 and 2
   ONNX Runtime threads, and their ratio to the baseline int8 row at the same threads (the
   issue's speed target: ratio <= 1 at 1 thread); the cross-validated defect IoU pooled over
   defect images and the image recall at <= 5 % false alarms (mean ± std over folds,
   :func:`models.seg_cv.recipe_summary`; ``-`` without CV results).
   A CV variant's latency is measured on a graph of its widths (from its fold JSON) with random
   weights, exported as its packages are (dynamic height/width) and, for int8, quantized like
   them (MinMax, U8S8) on random frames: latency does not depend on the weights. Variants of the
   same widths and precision share one measurement.
2. Runtimes (``runtime_rows``): the shipped package per frame at batch 1 and 4: torch eager fp32
   vs ONNX Runtime fp32 vs int8 (package, U8S8, S8S8), with achieved GFLOP/s and the share of a
   float32 matmul peak measured in the same run.
3. The streaming LSTM rows of :func:`bench.lstm.lstm_rows` where that module is present.

    python -m bench.models [--seconds 2] [--threads 2] [--candidates 12,24,48,72]

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
from models.package import BUILTIN_PACKAGES, load_package, reference_input

SEG = "seg-tiles"
CV_RESULTS = Path(__file__).resolve().parent / "results" / "seg_cv"
CANDIDATES = ((16, 32, 64, 96), (16, 16, 32, 64), (8, 16, 32, 48))
"""Widths timed at native size even without CV results: the shipped net, the student of
:data:`models.compress.STUDENT` and prune50's."""


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
    from models.package import make_dataset, preprocess_frame
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


# ---------------------------------------------------------------- variants


def _cv_variants(results: Path) -> dict[str, dict]:
    """Every variant with fold results: {name: {"config": its fold-0-or-first config, "precision"}},
    the recipes of :mod:`models.seg_cv` first (in its order), then the rest by name."""
    from models.seg_cv import RECIPES

    found = {}
    for folder in sorted(p for p in results.glob("*") if p.is_dir()):
        reports = sorted(folder.glob("fold*.json"))
        if reports:
            first = json.loads(reports[0].read_text())
            found[folder.name] = {"config": first["config"], "precision": first.get("precision", "fp32")}
    order = [name for name in RECIPES if name in found] + [name for name in found if name not in RECIPES]
    return {name: found[name] for name in order}


def _native_graph(widths: tuple[int, ...], reference: tuple[int, int], precision: str,
                  work: Path) -> tuple[bytes, float, tuple[int, int]]:
    """(graph, GFLOP at the padded reference, that input (h, w)) of a native TileUNet of ``widths``
    with random weights (seed 0), in ``precision`` (fp32, int8: MinMax U8S8 on random frames, fp16)."""
    import torch

    from models import quantize
    from models.segmentation import SegTrainConfig, TileUNet, conv_flops, export_for, model_input

    torch.manual_seed(0)
    model = TileUNet(tuple(widths)).eval()
    config = SegTrainConfig(resize="native", widths=tuple(widths), reference=tuple(reference))
    size = model_input(config)
    gflop = conv_flops(model, (1, 1, *size)) / 1e9
    graph = export_for(model, config)
    if precision == "fp32":
        return graph, gflop, size
    folder = work / f"{'-'.join(map(str, widths))}-{precision}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fp32.onnx").write_bytes(graph)
    if precision == "fp16":
        return quantize.convert_fp16(folder / "fp32.onnx"), gflop, size
    frames = np.random.default_rng(0).normal(0, 1, (4, 1, *size)).astype(np.float32)
    return quantize.quantize_int8(folder / "fp32.onnx", frames, "minmax", "u8s8", folder), gflop, size


def interleaved_ms(graphs: dict[str, tuple[bytes | str, tuple[int, int]]], threads: int,
                   seconds: float) -> dict[str, float]:
    """Median ms of one batch-1 ``session.run`` per graph ({key: (graph, (h, w))}), in rounds of 5
    runs of each graph in turn for about ``seconds`` per graph: on a shared CPU every graph sees
    the same load, so their ratios hold even when the absolute figures drift."""
    runners = {}
    for key, (graph, size) in graphs.items():
        runner = _ort_runner(_session(graph, threads), np.random.default_rng(0).normal(
            0, 1, (1, 1, *size)).astype(np.float32))
        runner()
        runners[key] = runner
    times: dict[str, list[float]] = {key: [] for key in runners}
    end = time.perf_counter() + seconds * len(runners)
    while time.perf_counter() < end or min(len(t) for t in times.values()) < 5:
        for key, runner in runners.items():
            for _ in range(5):
                t0 = time.perf_counter()
                runner()
                times[key].append(time.perf_counter() - t0)
    return {key: 1000 * float(np.median(t)) for key, t in times.items()}


def _mean_std(summary: dict, key: str) -> str:
    mean, std = summary["mean"].get(key, float("nan")), summary["std"].get(key, float("nan"))
    return "-" if mean != mean else f"{mean:.3f}±{std:.3f}"


def _label(widths: tuple[int, ...]) -> str:
    return ",".join(map(str, widths))


PREVIOUS = "seg-tiles 1.1.0 int8 (its net; random weights)"
PREVIOUS_WIDTHS = (16, 32, 64, 96)
"""The reference row: the net of the seg-tiles package before native resolution (1.1.0: every
frame resized to 256x256), int8 as its package was made; the speed target is ``x_base <= 1``."""


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _frame(config: dict) -> tuple[int, int]:
    """The frame a CV variant's net is timed on: the median tile (native) or its fixed input."""
    if config.get("resize", "fixed") == "fixed":
        return config["size"], config["size"]
    return tuple(config.get("reference", (325, 270)))


def _package_widths(package) -> tuple[int, ...]:
    widths = package.manifest.training.get("recipe", {}).get("widths")
    return tuple(widths) if widths else PREVIOUS_WIDTHS


def variant_rows(seconds: float, packages: Path = BUILTIN_PACKAGES, results: Path = CV_RESULTS,
                 candidates: tuple[tuple[int, ...], ...] = CANDIDATES,
                 threads: tuple[int, ...] = (1, 2)) -> tuple[list[dict], list[dict], str]:
    """(table rows, per-variant CV summaries, notes): see the module docstring, part 1."""
    from models.seg_cv import recipe_summary

    # (label, precision, widths, graph key, CV variant or None); graphs: key -> (graph, (h, w), GFLOP)
    entries: list[tuple[str, str, tuple[int, ...], tuple, str | None]] = []
    graphs: dict[tuple, tuple[bytes | str, tuple[int, int], float]] = {}
    work = Path(tempfile.mkdtemp(prefix="bench-variants-"))
    torch_ok = _torch_available()
    if torch_ok:  # the reference: the net of seg-tiles 1.1.0 (256x256 frames), as its int8 package was made
        key = (PREVIOUS_WIDTHS, "int8", (256, 256))
        graph, gflop, size = _native_graph(PREVIOUS_WIDTHS, (256, 256), "int8", work)
        graphs[key] = (graph, size, gflop)
        entries.append((PREVIOUS, "int8", PREVIOUS_WIDTHS, key, None))
    for precision in ("int8", "fp32", "fp16"):  # fp16 targets CUDA; the CPU provider runs it (by casts)
        folder = packages / f"{SEG}-{precision}"
        if folder.exists():
            package = load_package(folder)
            key = ("shipped", precision)
            graphs[key] = (str(package.model_path), reference_input(package.manifest.preprocess),
                           package.manifest.metrics.get("gflops", float("nan")))
            entries.append((f"{SEG}-{precision} (shipped)", precision, _package_widths(package), key,
                            package.manifest.training.get("cv_recipe")))
    cv = _cv_variants(results)
    wanted = [(name, tuple(v["config"]["widths"]), v["precision"], _frame(v["config"]), name) for name, v in cv.items()]
    for widths in candidates:
        for precision in ("fp32", "int8"):
            if not any(w == widths and p == precision for _, w, p, _, _ in wanted):
                wanted.append(("candidate (untrained)", widths, precision, (325, 270), None))
    notes = [] if torch_ok else ["native variants: no GFLOP or latency (torch is needed to build their graphs)"]
    for label, widths, precision, reference, variant in wanted:
        key = (widths, precision, reference)
        if torch_ok and key not in graphs:
            graph, gflop, size = _native_graph(widths, reference, precision, work)
            graphs[key] = (graph, size, gflop)
        entries.append((label, precision, widths, key, variant))
    ms = {t: interleaved_ms({k: (g, size) for k, (g, size, _) in graphs.items()}, t, seconds) for t in threads}
    base = entries[0][3] if entries else None
    rows, summaries = [], []
    for label, precision, widths, key, variant in entries:
        graph = graphs.get(key)
        row: dict = {"variant": label, "precision": precision, "widths": _label(widths),
                     "input": f"{graph[1][0]}x{graph[1][1]}" if graph else "-",
                     "gflop": graph[2] if graph else float("nan")}
        for t in threads:
            row[f"ms_{t}t"] = ms[t].get(key, float("nan"))
        for t in threads:
            row[f"x_base_{t}t"] = ms[t][key] / ms[t][base] if graph and base else float("nan")
        summary = recipe_summary(variant, results) if variant else None
        rule = summary["alarm_rule"] if summary else None
        row |= {"folds": len(summary["folds"]) if summary else 0,
                "iou_defect": _mean_std(summary, "iou_defect_images") if rule else "-",
                "recall": _mean_std(summary, f"recall[{rule}]") if rule else "-",
                "false_alarms": _mean_std(summary, f"false_alarms[{rule}]") if rule else "-",
                "alarm_rule": rule or "-"}
        rows.append(row)
        if rule:
            summaries.append({"variant": variant, "gflop": row["gflop"],
                              **{f"ms_{t}t": row[f"ms_{t}t"] for t in threads}} | summary)
    notes.append(f"x_base: ms over the first row's ({entries[0][0] if entries else '-'}) at the same threads, in "
                 f"the same run (interleaved rounds); native rows: graphs of their widths with random weights "
                 f"(latency does not depend on weights), int8 by MinMax U8S8 as the packages, one graph per "
                 f"(widths, precision); GFLOP at the input shown; IoU over defect images and recall at <= 5 % "
                 f"false alarms (the variant's best alarm rule), mean±std over folds, from {results}")
    return rows, summaries, "\n".join(notes)


def main(seconds: float = 2.0, threads: int = 2, packages: Path = BUILTIN_PACKAGES,
         out: Optional[Path] = None, results: Path = CV_RESULTS, candidates: str = ";".join(
             ",".join(map(str, w)) for w in CANDIDATES), runtimes: bool = True) -> None:
    """``candidates``: widths timed at native size without CV results, ``a,b,c,d;a,b,c,d``;
    ``runtimes``: also the runtime comparison of the shipped package (part 2)."""
    widths = tuple(tuple(int(w) for w in group.split(",")) for group in candidates.split(";") if group)
    rows, summaries, notes = variant_rows(seconds, packages, results, widths)
    runtime_rows, runtime_notes = seg_rows(seconds, threads, packages) if runtimes else ([], "")
    try:
        from bench.lstm import lstm_rows
    except ImportError as exc:
        lstm, lstm_note = [], f"LSTM rows: bench.lstm not importable here ({exc})"
    else:
        lstm, lstm_note = lstm_rows(seconds), "LSTM rows: bench.lstm.lstm_rows"
    if runtime_rows:
        print_rows(f"{SEG}: per-frame latency by runtime, CPU, {threads} intra-op thread(s)", runtime_rows)
    path = report("models", f"{SEG} variants: GFLOP/frame, ms/frame at batch 1 (1 and 2 threads; x_base: vs the "
                  f"first row), cross-validated IoU and recall", rows,
                  notes="\n".join(n for n in (notes, runtime_notes, lstm_note) if n), out=out)
    if lstm:
        print_rows("streaming LSTM (bench.lstm)", lstm)
    result = json.loads(path.read_text())
    result |= {"cv": summaries, "runtime_rows": runtime_rows, "lstm_rows": lstm}
    path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    typer.run(main)
