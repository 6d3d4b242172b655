"""Streaming LSTM anomaly packages for any sensor set, and the shipped ``anomaly-skab``.

- Model: one LSTM layer (hidden 32) and a linear head forecasting the next normalised sample as
  ``x_t + head(h_t)`` from the differences ``x_t - x_(t-1)``; exported as a ONE-STEP graph
  ``(x, h, c) -> (y, h_out, c_out)`` with a dynamic batch, so the edge carries ``(h, c)`` per sensor
  group and scores many groups per run. Any number of channels (1..64 tested).
- Normalisation is per sensor group, as the edge does it online (:mod:`models.package.anomaly`): the first
  ``K = calibration_steps * normalise_fraction`` samples fit the input mean/std. Training windows are
  cut the same way: mean/std from the K samples before a window.
- :func:`build_anomaly_package`: the generic build (a plant's own normal series -> a package):
  train, export, ONNX-vs-torch parity (refused above :data:`PARITY_TOLERANCE`), package-level constants,
  evaluation of labelled series through the edge runtime, a step bench, and ``training.json`` (the
  recipe, the data's sha256 and row counts, extra figures) listed and hashed in the manifest.
- :func:`build_skab_package`: ``anomaly-skab``, one call of it on SKAB's normal rows (the first 400
  rows of every file, the protocol's anomaly-free part; never a scored row, never a label) with the
  postprocess settings chosen by cross-validation (:mod:`models.anomaly_cv`).

    python -m models.anomaly [--out models/packages] [--nab]
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models import skab
from models.package import (
    MAX_CHANNELS,
    AnomalyPostprocess,
    AnomalyPreprocess,
    Manifest,
    Package,
    Series,
    StreamingAnomalyModel,
    TensorSpec,
    fit_normalisation,
    fit_residual_scale,
    load_package,
    sha256_file,
    write_manifest,
    write_package,
)

log = logging.getLogger(__name__)

FAST_START = "fast-start"
NAME = "anomaly-skab"
VERSION = "1.1.0"
NAB_NAME = "anomaly-nab"
NAB_VERSION = "1.0.0"
DEFAULT_OUT = Path(__file__).resolve().parent / "packages"
TRAINING_FILE = "training.json"
PARITY_TOLERANCE = 1e-4
"""Largest |torch - ONNX| forecast difference (normalised units) a build accepts."""
MAX_WINDOWS = 8192
"""Training windows kept (evenly spaced over the data): bounds memory and time on long recordings."""
DEFAULT_POSTPROCESS: dict[str, Any] = {
    "level_weight": 1.0, "level_alpha": 0.1, "forecast_weight": 0.0, "min_scale": 0.006, "drift_halflife": 300.0,
    "exit_ratio": 1.0, "clear_steps": 5, "ema_alpha": 1.0, "max_false_alarms_per_day": 1.0,
}
"""Runtime settings of a new package unless overridden: the setting leave-files-out cross-validation chose on
all SKAB files (``anomaly-skab``'s; see its training.json). Re-tune on a plant's labelled files with
:mod:`models.anomaly_cv`."""


@dataclass(frozen=True)
class Recipe:
    """Model, training and calibration settings (few, chosen to generalise; see the report)."""

    hidden: int = 32
    layers: int = 1
    steps: int = 600
    batch: int = 32
    window: int = 128
    lr: float = 1e-2
    seed: int = 0
    calibration_steps: int = skab.PROTOCOL_STEPS
    normalise_fraction: float = 0.5
    warmup_steps: int = 10
    min_scale: float = 1e-3

    def postprocess(self, residual_scale: np.ndarray, threshold: float,
                    overrides: Mapping[str, Any] | None = None) -> AnomalyPostprocess:
        """The runtime settings: this recipe's calibration fields, then ``overrides`` (any AnomalyPostprocess
        field, ``profiles`` included), validated like a manifest."""
        base = AnomalyPostprocess(
            residual_scale=[float(v) for v in residual_scale], threshold=float(threshold),
            warmup_steps=self.warmup_steps, calibration_steps=self.calibration_steps,
            normalise_fraction=self.normalise_fraction, min_scale=self.min_scale)
        return AnomalyPostprocess.model_validate(base.model_dump() | dict(overrides or {}))


TINY_RECIPE = Recipe(steps=5, batch=4, window=32)


class AnomalyBuildError(ValueError):
    """Training data or an exported graph that cannot make a package (the message says why)."""


class Forecaster(nn.Module):
    """Next-difference forecaster on normalised channels: dx_t = x_t - x_(t-1) in, head(LSTM(dx_<=t))
    out, so the forecast of x_(t+1) is x_t + output. Level-free: drift does not move its inputs."""

    def __init__(self, channels: int = len(skab.CHANNELS), hidden: int = 32, layers: int = 1) -> None:
        super().__init__()
        self.lstm = nn.LSTM(channels, hidden, layers)
        self.head = nn.Linear(hidden, channels)

    @property
    def channels(self) -> int:
        return self.lstm.input_size

    def forward(self, dx: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
        out, state = self.lstm(dx, state)
        return self.head(out), state

    def forecast(self, x: torch.Tensor) -> torch.Tensor:
        """Forecasts [T, B, C] of x[t+1] for a whole normalised sequence x [T, B, C], from a zero state."""
        dx = torch.cat([torch.zeros_like(x[:1]), x[1:] - x[:-1]])
        return x + self(dx)[0]


class ForecasterStep(nn.Module):
    """One streaming step: (dx [B,C], h, c [layers,B,H]) -> (y [B,C] next difference, h_out, c_out)."""

    def __init__(self, forecaster: Forecaster) -> None:
        super().__init__()
        self.forecaster = forecaster

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        y, (h_out, c_out) = self.forecaster(x.unsqueeze(0), (h, c))
        return y[0], h_out, c_out


# ---------------------------------------------------------------- data


def fill_missing(values: np.ndarray, name: str = "series") -> np.ndarray:
    """[T, C] float32 with NaN forward-filled per channel (leading NaN take the first value seen).
    A channel with no value at all cannot be learned: AnomalyBuildError names it."""
    values = np.array(values, np.float32, copy=True).reshape(len(values), -1)
    nan = np.isnan(values)
    if not nan.any():
        return values
    empty = np.flatnonzero(nan.all(0))
    if len(empty):
        raise AnomalyBuildError(f"{name}: channel(s) {', '.join(map(str, empty))} have no value at all")
    index = np.where(~nan, np.arange(len(values))[:, None], 0)
    np.maximum.accumulate(index, axis=0, out=index)
    filled = values[index, np.arange(values.shape[1])]
    first = np.argmax(~nan, axis=0)
    lead = np.arange(len(values))[:, None] < first
    return np.where(lead, values[first, np.arange(values.shape[1])], filled)


def series_sha256(series: Sequence[np.ndarray]) -> str:
    """Hash of the training data exactly as trained on (float32 bytes and shapes, in order)."""
    digest = hashlib.sha256()
    for values in series:
        array = np.ascontiguousarray(values, np.float32)
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def training_series(root: Path | None = None) -> list[np.ndarray]:
    """SKAB's normal rows: the first 400 rows (protocol-allowed) of every file, anomaly-free.csv included
    (the rest of anomaly-free.csv stays unseen: its alarm share is a held-out figure)."""
    root = root or skab.skab_root()
    series = [f.values[: skab.PROTOCOL_STEPS] for f in skab.load_folder(root)]
    if not series:
        raise FileNotFoundError(f"no SKAB files under {root} (set EDGELINE_DATA)")
    return series


def make_windows(series: Sequence[np.ndarray], recipe: Recipe) -> np.ndarray:
    """Training windows [N, window, C], normalised like the edge (stats of the K rows before each window);
    at most :data:`MAX_WINDOWS`, evenly spaced over all admissible starts."""
    k = round(recipe.calibration_steps * recipe.normalise_fraction)
    starts = []
    for i, values in enumerate(series):
        w = min(recipe.window, len(values) - k)
        if w >= 16:
            starts += [(i, s, w) for s in range(k, len(values) - w + 1, 8)]
    if not starts:
        raise AnomalyBuildError(f"no normal series longer than {k + 16} rows (normalisation {k} + 16): "
                                "give longer normal parts or a shorter calibration")
    keep = np.unique(np.linspace(0, len(starts) - 1, min(len(starts), MAX_WINDOWS)).round().astype(int))
    out = []
    for i, s, w in (starts[j] for j in keep):
        values = series[i]
        mean, std = fit_normalisation(values[s - k : s], recipe.min_scale)
        window = (values[s : s + w] - mean) / std
        if w < recipe.window:  # short parts: pad by repeating the last row (a flat tail is easy to forecast)
            window = np.concatenate([window, np.repeat(window[-1:], recipe.window - w, 0)])
        out.append(window)
    return np.clip(np.stack(out), -20, 20).astype(np.float32)


def train(series: Sequence[np.ndarray], recipe: Recipe, tick: Callable[[int], object] = lambda n: None) -> Forecaster:
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    windows = torch.from_numpy(make_windows(series, recipe))
    model = Forecaster(windows.shape[-1], recipe.hidden, recipe.layers)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.1)
    skip = recipe.warmup_steps
    for _ in range(recipe.steps):
        batch = windows[rng.integers(len(windows), size=recipe.batch)].transpose(0, 1)  # T, B, C
        pred = model.forecast(batch[:-1])
        loss = nn.functional.smooth_l1_loss(pred[skip:], batch[1:][skip:])
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        tick(1)
    return model.eval()


# ---------------------------------------------------------------- export, parity, constants


def export_step(model: Forecaster) -> bytes:
    step, hidden, layers = ForecasterStep(model).eval(), model.lstm.hidden_size, model.lstm.num_layers
    args = (torch.zeros(1, model.channels), torch.zeros(layers, 1, hidden), torch.zeros(layers, 1, hidden))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            step, args, buf, dynamo=False, opset_version=17,
            input_names=["x", "h", "c"], output_names=["y", "h_out", "c_out"],
            dynamic_axes={"x": {0: "batch"}, "h": {1: "batch"}, "c": {1: "batch"},
                          "y": {0: "batch"}, "h_out": {1: "batch"}, "c_out": {1: "batch"}},
        )
    return buf.getvalue()


def step_parity(model: Forecaster, onnx_path: Path, steps: int = 64, groups: int = 5) -> float:
    """Max abs difference of the forecasts, torch full sequence vs the ONNX step graph streamed, batched groups."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    xs = np.random.default_rng(2).normal(0, 1.5, (steps, groups, model.channels)).astype(np.float32)
    with torch.no_grad():
        ref, _ = model(torch.from_numpy(xs))
    h = c = np.zeros((model.lstm.num_layers, groups, model.lstm.hidden_size), np.float32)
    diff = 0.0
    for t in range(steps):
        y, h, c = session.run(None, {"x": xs[t], "h": h, "c": c})
        diff = max(diff, float(np.abs(y - ref[t].numpy()).max()))
    return diff


def residual_scales(model: Forecaster, series: Sequence[np.ndarray], post: AnomalyPostprocess) -> np.ndarray:
    """Median over series of the per-channel forecast-residual RMS on each series' calibration part, as a
    group fits it: normalised by its first K rows, LSTM from row K, residuals after the warm-up."""
    n = post.calibration_steps or len(series[0])
    k = max(1, round(n * post.normalise_fraction))
    scales = []
    for values in series:
        if len(values) < k + post.warmup_steps + 10:
            continue
        mean, std = fit_normalisation(values[:k], post.min_scale)
        x = ((values[k:n] - mean) / std).astype(np.float32)
        with torch.no_grad():
            pred = model.forecast(torch.from_numpy(x)[:, None])[:, 0].numpy()
        scales.append(fit_residual_scale((x[1:] - pred[:-1])[post.warmup_steps :], post.min_scale))
    if not scales:
        return np.ones(model.channels, np.float32)
    return np.median(scales, 0).astype(np.float32)


def calibrated_thresholds(package: Package, series: Sequence[np.ndarray]) -> list[float]:
    """Each series' own threshold as the edge runtime calibrates it (one group per series, all batched)."""
    model = StreamingAnomalyModel(package)
    steps = model.calibration.steps
    usable = [v for v in series if len(v) >= steps]
    names = [f"cal{i}" for i in range(len(usable))]
    for t in range(steps):
        model.step({name: values[t] for name, values in zip(names, usable)})
    return [th for name in names if (th := model.group_threshold(name)) is not None]


def make_manifest(model: Forecaster, channels: Sequence[str], name: str, version: str,
                  series: Sequence[np.ndarray], post: AnomalyPostprocess) -> Manifest:
    """The manifest with package-level constants: mean/std of all normal rows (used with calibration off),
    the median residual scales; the threshold is a placeholder until :func:`calibrated_thresholds`."""
    mean, std = fit_normalisation(np.concatenate(series), post.min_scale)
    hidden, layers, c = model.lstm.hidden_size, model.lstm.num_layers, model.channels
    state = TensorSpec(name="h", shape=[layers, "batch", hidden])
    return Manifest(
        name=name, version=version, task="anomaly",
        inputs=[TensorSpec(name="x", shape=["batch", c]), state, state.model_copy(update={"name": "c"})],
        outputs=[TensorSpec(name="y", shape=["batch", c]), state.model_copy(update={"name": "h_out"}),
                 state.model_copy(update={"name": "c_out"})],
        preprocess=AnomalyPreprocess(channels=list(channels), mean=mean.astype(float).tolist(),
                                     std=std.astype(float).tolist(), hidden_size=hidden, num_layers=layers,
                                     difference=True),
        postprocess=post.model_copy(update={"residual_scale": residual_scales(model, series, post).tolist()}),
        metrics={"params": float(sum(p.numel() for p in model.parameters()))},
    )


# ---------------------------------------------------------------- evaluation, bench, writing


def evaluate_labelled(package: Package, labelled: Sequence[Series | skab.SkabFile],
                      prefix: str = "eval_") -> dict[str, float]:
    """Pooled and per-folder F1/FAR/MAR of labelled series through the edge runtime, each calibrated on its
    own first ``calibration_steps`` rows (the SKAB protocol when that is 400)."""
    files = [f if isinstance(f, skab.SkabFile) else skab.SkabFile.from_series(f) for f in labelled]
    model = StreamingAnomalyModel(package)
    return {f"{prefix}{k}": v for k, v in skab.summary(skab.stream_files(model, files)).items()}


def bench_step(package: Package, groups: int = 64, seconds: float = 1.0) -> dict[str, float]:
    model = StreamingAnomalyModel(package, calibration_steps=0)
    sample = {f"g{i}": np.asarray(package.manifest.preprocess.mean, np.float32) for i in range(groups)}
    model.step(sample)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model.step(sample)
        n += 1
    per_tick = (time.perf_counter() - t0) / n
    return {f"ms_per_tick_batch{groups}": 1000 * per_tick, f"us_per_sample_batch{groups}": 1e6 * per_tick / groups,
            "threads": 1.0}


def write_anomaly_package(folder: Path, manifest: Manifest, onnx_bytes: bytes,
                          training: Mapping[str, Any] | None = None) -> Package:
    """``model.onnx`` (+ ``training.json`` when given), both hashed in an unsigned manifest."""
    (Path(folder) / TRAINING_FILE).unlink(missing_ok=True)
    package = write_package(folder, manifest, onnx_bytes)
    if training is None:
        return package
    (package.folder / TRAINING_FILE).write_text(json.dumps(training, indent=2, sort_keys=True) + "\n")
    files = package.manifest.files | {TRAINING_FILE: sha256_file(package.folder / TRAINING_FILE)}
    write_manifest(package.folder, package.manifest.model_copy(update={"files": files}))
    return load_package(package.folder)


def build_anomaly_package(
    series: Sequence[np.ndarray],
    channels: Sequence[str],
    name: str,
    version: str,
    out_dir: Path,
    recipe: Recipe | None = None,
    evaluate: Sequence[Series] | None = None,
    postprocess: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> Package:
    """Train on normal series, export, check parity, calibrate, evaluate, bench; write ``<out_dir>/<name>``.

    ``series``: normal data, each [T, C] in ``channels`` order (NaN forward-filled); ``evaluate``: labelled
    series scored through the edge runtime (metrics ``eval_pooled_f1`` ...); ``postprocess``: overrides of
    the runtime settings (any AnomalyPostprocess field, ``profiles`` included) on top of
    :data:`DEFAULT_POSTPROCESS`. The threshold is calibrated per sensor group on its first
    ``recipe.calibration_steps`` samples by the runtime; the manifest's is the median over the normal series
    (what a group reports while calibrating). Unsigned; raises
    AnomalyBuildError on bad data or an ONNX graph that disagrees with torch above PARITY_TOLERANCE.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    recipe, channels = _aligned(recipe or Recipe(), postprocess or {}), tuple(channels)
    data = _checked_series(series, channels)
    columns = (TextColumn("{task.description:<34}"), BarColumn(), TextColumn("{task.completed:>5.0f}/{task.total:.0f}"))
    with Progress(*columns, TimeElapsedColumn(), disable=not progress) as bar:
        task = bar.add_task(f"{name}: train", total=recipe.steps)
        t0 = time.perf_counter()
        model = train(data, recipe, lambda n: bar.advance(task, n))
        train_s = time.perf_counter() - t0
        bar.update(task, description=f"{name}: export + parity")
        onnx_bytes = export_step(model)
        post = recipe.postprocess(np.ones(len(channels)), 1.0, DEFAULT_POSTPROCESS | dict(postprocess or {}))
        manifest = make_manifest(model, channels, name, version, data, post)
        package = write_anomaly_package(Path(out_dir) / name, manifest, onnx_bytes)
        parity = step_parity(model, package.model_path)
        if not parity <= PARITY_TOLERANCE:
            raise AnomalyBuildError(f"{name}: ONNX step graph differs from torch by {parity:.3g} "
                                    f"(> {PARITY_TOLERANCE:g}); not packaged")
        bar.update(task, description=f"{name}: calibrate, evaluate, bench")
        metrics = {"onnx_parity_max_abs_diff": parity, "train_seconds": train_s,
                   "train_rows": float(sum(len(v) for v in data)), "train_series": float(len(data))}
        training = {"recipe": asdict(recipe), "data_sha256": series_sha256(data),
                    "data_rows": [len(v) for v in data], "channels": list(channels)}
        return configure(package, data, {}, evaluate, metrics, training)


def configure(package: Package, normal: Sequence[np.ndarray], overrides: Mapping[str, Any],
              evaluate: Sequence[Series | skab.SkabFile] | None = None, metrics: Mapping[str, float] | None = None,
              training: Mapping[str, Any] | None = None) -> Package:
    """Rewrite a built package with postprocess ``overrides``: the package-level threshold re-calibrated on
    the normal series through the runtime, labelled series evaluated (``eval_*``), the step bench; extra
    ``metrics`` and ``training`` entries merged into the manifest metrics and training.json."""
    post = AnomalyPostprocess.model_validate(package.manifest.postprocess.model_dump() | dict(overrides))
    package = replace(package, manifest=package.manifest.model_copy(update={"postprocess": post}))
    thresholds = calibrated_thresholds(package, normal)
    if thresholds:
        post = post.model_copy(update={"threshold": float(np.median(thresholds))})
        package = replace(package, manifest=package.manifest.model_copy(update={"postprocess": post}))
    figures = package.manifest.metrics | dict(metrics or {})
    if evaluate:
        figures |= evaluate_labelled(package, evaluate)
    manifest = package.manifest.model_copy(update={"metrics": figures, "bench": bench_step(package)})
    return write_anomaly_package(package.folder, manifest, package.model_path.read_bytes(),
                                 _training(package) | dict(training or {}))


def _training(package: Package) -> dict[str, Any]:
    path = package.folder / TRAINING_FILE
    return json.loads(path.read_text()) if TRAINING_FILE in package.manifest.files else {}


def _aligned(recipe: Recipe, postprocess: Mapping[str, Any]) -> Recipe:
    """The recipe with the calibration the package will run (an override of ``calibration_steps`` or
    ``normalise_fraction``): training windows are normalised on as many rows as a group will be."""
    fields = {k: type(getattr(recipe, k))(postprocess[k]) for k in ("calibration_steps", "normalise_fraction")
              if postprocess.get(k) is not None}
    return replace(recipe, **fields)


def _checked_series(series: Sequence[np.ndarray], channels: tuple[str, ...]) -> list[np.ndarray]:
    if not 1 <= len(channels) <= MAX_CHANNELS:
        raise AnomalyBuildError(f"{len(channels)} channels: a package takes 1 to {MAX_CHANNELS}")
    if len(set(channels)) != len(channels):
        raise AnomalyBuildError(f"channel names repeat: {', '.join(channels)}")
    out = []
    for i, values in enumerate(series):
        array = np.asarray(values, np.float32)
        array = array.reshape(-1, 1) if array.ndim == 1 else array
        if array.ndim != 2 or array.shape[1] != len(channels):
            raise AnomalyBuildError(f"normal series {i}: shape {array.shape}, expected [T, {len(channels)}]")
        out.append(fill_missing(array, f"normal series {i}"))
    if not out:
        raise AnomalyBuildError("no normal series to train on")
    return out


# ---------------------------------------------------------------- anomaly-skab


def build_skab_package(out_dir: Path = DEFAULT_OUT, progress: bool = True, recipe: Recipe | None = None,
                       data: Path | None = None, grid: Sequence[Mapping[str, float]] | None = None,
                       folds: int = 5, fast_grid: Sequence[Mapping[str, float]] | None = None,
                       pump_samples: int = 6000) -> Package:
    """``anomaly-skab``: the generic build on SKAB's normal rows, then the postprocess setting chosen by
    leave-files-out cross-validation (:mod:`models.anomaly_cv`) over the labelled files and chunks of
    anomaly-free.csv, and the ``fast-start`` profile tuned on synthetic pumps.

    Metrics: ``cv_*`` (held-out: the figures to quote), ``eval_*`` (in-sample: every file with the final
    setting), ``anomaly_free_alarm_share`` (the whole file calibrated on its first 400 rows), ``synth_*``
    (fast-start on report seeds). training.json holds the per-fold choices and tables. ``grid``/``fast_grid``
    default to :data:`models.anomaly_cv.GRID`/``FAST_GRID``; ``pump_samples`` per synthetic pump."""
    from models import anomaly_cv

    root = data or skab.skab_root()
    normal = training_series(root)
    package = build_anomaly_package(normal, skab.CHANNELS, NAME, VERSION, out_dir, recipe,
                                    postprocess={"max_false_alarms_per_day": None}, progress=progress)
    files = anomaly_cv.cv_files(root)
    report = anomaly_cv.cross_validate(package, files, grid or anomaly_cv.GRID, folds=folds, progress=progress)
    tuned = anomaly_cv.with_overrides(package, report.final)
    fast = anomaly_cv.tune_fast_start(tuned, fast_grid, pump_samples)
    labelled = [f for f in files if f.folder != anomaly_cv.FREE_FOLDER]
    metrics = ({f"cv_{k}": v for k, v in report.pooled().items()} | fast.metrics()
               | {"anomaly_free_alarm_share": anomaly_cv.free_alarm_share(tuned, root)})
    overrides = report.final | {"profiles": {FAST_START: fast.chosen}}
    return configure(package, normal, overrides, labelled, metrics,
                     {"cross_validation": report.as_json(), "fast_start": fast.as_json()})


def build_nab_package(out_dir: Path = DEFAULT_OUT, progress: bool = True, recipe: Recipe | None = None,
                      data: Path | None = None, folds: int = 5) -> Package:
    """``anomaly-nab``: a univariate package trained on the probation rows of every NAB file (the part NAB lets
    a detector learn from), postprocess chosen by leave-files-out CV over the NAB files
    (:func:`models.anomaly_cv.cross_validate_nab`, each file calibrated on its probation rows as the bench
    runs it). Metrics ``cv_nab_*`` are the held-out figures on realKnownCause + realAWSCloudwatch."""
    from models import anomaly_cv, nab

    files = nab.load_corpus(data)
    normal = [f.values[: f.probation] for f in files]
    package = build_anomaly_package(normal, ("value",), NAB_NAME, NAB_VERSION, out_dir, recipe,
                                    postprocess={"max_false_alarms_per_day": None}, progress=progress)
    report = anomaly_cv.cross_validate_nab(package, files, folds=folds)
    metrics = {f"cv_nab_{k}": v for k, v in report["pooled"].items()}
    return configure(package, normal, report["final"], None, metrics, {"cross_validation": report})


def main(out: Path = DEFAULT_OUT, nab: bool = False) -> None:
    """Build anomaly-skab (or, with --nab, anomaly-nab) into OUT."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    package = build_nab_package(out) if nab else build_skab_package(out)
    shown = {k: float(f"{v:.4g}") for k, v in package.manifest.metrics.items()}
    print(f"{package.ref} -> {package.folder}: {shown} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    import typer

    typer.run(main)
