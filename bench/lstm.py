"""Does the stateful stream pay? Per NEW sample cost of the LSTM forecaster, on ONE CPU core.

    python -m bench.lstm [--seconds 3]

(a) torch full-window recompute: for every new sample, re-run the LSTM over the last 128 samples
    (what a stateless window model does); (b) ONNX Runtime streaming step: one step with the
    carried (h, c); (c) the same through :class:`edge.anomaly.StreamingAnomalyModel.step` (the
    edge's whole per-tick path: normalisation, state gather/scatter, scoring). Each at 1 and 64
    sensor groups per call; torch.set_num_threads(1), ORT intra-op 1. Speed-up is against (a) at
    the same batch, measured in the same run. Needs torch (the models extra).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

PACKAGE = Path(__file__).resolve().parents[1] / "models" / "packages" / "anomaly-skab"
WINDOW = 128
BATCHES = (1, 64)


def _rate(call, per_call: int, seconds: float, repeats: int = 3) -> float:
    """Samples per second of ``call`` (which handles ``per_call`` new samples): the best of
    ``repeats`` timings of ``seconds / repeats`` each, so that a burst of noise on this shared
    box hits one repeat, not the figure (both sides of every ratio are measured the same way)."""
    call()
    best = 0.0
    for _ in range(repeats):
        done, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds / repeats:
            call()
            done += per_call
        best = max(best, done / elapsed)
    return best


def lstm_rows(seconds: float = 3.0, package: Path = PACKAGE) -> list[dict[str, Any]]:
    """One row per (method, groups): samples/s, µs per sample, speed-up vs torch recompute at that batch."""
    import onnxruntime as ort
    import torch

    from edge.anomaly import StreamingAnomalyModel
    from models.anomaly import Forecaster
    from models.package import load_package

    torch.set_num_threads(1)
    pkg = load_package(package)
    pre = pkg.manifest.preprocess
    channels, hidden, layers = len(pre.channels), pre.hidden_size, pre.num_layers
    model = Forecaster(channels, hidden, layers).eval()  # same shape as the package; weights do not change timing
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    session = ort.InferenceSession(str(pkg.model_path), options, providers=["CPUExecutionProvider"])
    streaming = StreamingAnomalyModel(pkg, threads=1, calibration_steps=0)
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    per = max(0.3, seconds / 3)
    for batch in BATCHES:
        window = torch.from_numpy(rng.normal(0, 1, (WINDOW, batch, channels)).astype(np.float32))

        def recompute(window: torch.Tensor = window) -> None:
            with torch.no_grad():
                model(window)

        x = rng.normal(0, 1, (batch, channels)).astype(np.float32)
        state = {"h": np.zeros((layers, batch, hidden), np.float32), "c": np.zeros((layers, batch, hidden), np.float32)}

        def step(x: np.ndarray = x, state: dict[str, np.ndarray] = state) -> None:
            _, state["h"], state["c"] = session.run(None, {"x": x, "h": state["h"], "c": state["c"]})

        tick = {f"g{i}": np.asarray(pre.mean, np.float32) + 0.01 * rng.normal(size=channels).astype(np.float32)
                for i in range(batch)}
        base = _rate(recompute, batch, per)
        for method, rate in (("torch recompute w128", base), ("ORT step", _rate(step, batch, per)),
                             ("edge StreamingAnomalyModel.step", _rate(lambda tick=tick: streaming.step(tick), batch, per))):
            rows.append({"method": method, "groups": batch, "samples_per_s": rate, "us_per_sample": 1e6 / rate,
                         "speedup_vs_recompute": rate / base})
    return rows


def main(seconds: float = 3.0, out: Path | None = None) -> None:
    from bench.report import report

    rows = lstm_rows(seconds)
    report("lstm", f"LSTM forecaster (anomaly-skab) per new sample, 1 CPU core, window {WINDOW}", rows,
           notes="speed-up is against the torch full-window recompute at the same number of groups, same run", out=out)


if __name__ == "__main__":
    import typer

    typer.run(main)
