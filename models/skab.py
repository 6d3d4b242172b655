"""SKAB (Skoltech Anomaly Benchmark) files and its published outlier-detection protocol, on ONNX Runtime.

Protocol (as SKAB scores its baselines): per file, fit and calibrate on the first 400 rows (known
anomaly-free), score every later row, and count binary outcomes over all scored rows, pooled
over files: F1, FAR = FP / (FP + TN) (false alarm rate) and MAR = FN / (FN + TP) (missed alarm
rate). Per-file numbers are given as well.

The calibration is not done here: :class:`models.package.anomaly.StreamingAnomalyModel` does it online per
sensor group with ``calibration_steps=400``, exactly as an edge agent does on a live pump; each
file is one group and all files stream together, one batched step per row. No torch.

Data: ``$EDGELINE_DATA/skab`` (default ``<repo>/../shared/data/skab``), from github.com/waico/SKAB
(GPL-3.0; not copied into this repository).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.package import CHANNELS, Series, StreamingAnomalyModel, read_series_csv

log = logging.getLogger(__name__)

PROTOCOL_STEPS = 400
REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """``$EDGELINE_DATA`` or ``<repo>/../shared/data``."""
    return Path(os.environ.get("EDGELINE_DATA") or REPO.parent / "shared" / "data")


def skab_root() -> Path:
    return data_root() / "skab"


@dataclass(frozen=True)
class SkabFile:
    path: Path
    name: str  # relative to the folder it was found under, e.g. "valve1/3.csv"
    values: np.ndarray  # [T, C] float32 (SKAB: the 8 CHANNELS in order); NaN where missing
    labels: np.ndarray | None  # [T] bool, None when the file has no `anomaly` column

    @property
    def folder(self) -> str:
        parent = Path(self.name).parent.as_posix()
        return "." if parent in ("", ".") else parent

    @classmethod
    def from_series(cls, series: Series) -> SkabFile:
        """Any labelled (or unlabelled) series of :mod:`models.package.series`, whatever its channels."""
        return cls(series.path, series.name, series.values, series.labels)


def read_skab_file(path: Path, name: str | None = None) -> SkabFile:
    """One SKAB-format CSV (``;``-separated, the eight channels by name, optional ``anomaly``); an empty or
    unparseable value is NaN (the runtime imputes it). Raises ValueError naming a missing column."""
    return SkabFile.from_series(read_series_csv(path, columns=CHANNELS, label_column="anomaly", name=name))


def find_files(root: Path) -> list[Path]:
    """Every ``*.csv`` under ``root`` (recursively), or ``root`` itself when it is a file; sorted naturally."""
    root = Path(root)
    if root.is_file():
        return [root]

    def natural(p: Path) -> list[object]:
        rel = p.relative_to(root).as_posix()
        return [int(part) if part.isdigit() else part for part in _split_digits(rel)]

    return sorted(root.rglob("*.csv"), key=natural)


def _split_digits(text: str) -> list[str]:
    out, current = [], ""
    for ch in text:
        if current and ch.isdigit() != current[-1].isdigit():
            out.append(current)
            current = ""
        current += ch
    return out + ([current] if current else [])


def load_folder(root: Path, skip_unlabelled: bool = False) -> list[SkabFile]:
    """The SKAB files under ``root``; files that cannot be read are skipped with a warning."""
    root = Path(root)
    base = root.parent if root.is_file() else root
    out = []
    for path in find_files(root):
        try:
            f = read_skab_file(path, path.relative_to(base).as_posix())
        except (ValueError, KeyError, OSError) as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        if f.labels is None and skip_unlabelled:
            log.warning("skipping %s: no anomaly column", path)
            continue
        out.append(f)
    return out


# ---------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Counts:
    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.fp + other.fp, self.tn + other.tn, self.fn + other.fn)

    @classmethod
    def of(cls, labels: np.ndarray, alarms: np.ndarray) -> Counts:
        labels, alarms = np.asarray(labels, bool), np.asarray(alarms, bool)
        return cls(int((labels & alarms).sum()), int((~labels & alarms).sum()),
                   int((~labels & ~alarms).sum()), int((labels & ~alarms).sum()))

    @property
    def rows(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def f1(self) -> float:
        return 2 * self.tp / (2 * self.tp + self.fp + self.fn) if self.tp else 0.0

    @property
    def far(self) -> float:
        """False alarm rate FP / (FP + TN)."""
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else 0.0

    @property
    def mar(self) -> float:
        """Missed alarm rate FN / (FN + TP)."""
        return self.fn / (self.fn + self.tp) if self.fn + self.tp else 0.0

    def metrics(self) -> dict[str, float]:
        return {"f1": self.f1, "far": self.far, "mar": self.mar}


def pooled(counts: Iterable[Counts]) -> Counts:
    return sum(counts, Counts())


# ---------------------------------------------------------------- protocol


@dataclass(frozen=True)
class FileResult:
    file: SkabFile
    scores: np.ndarray  # [T] streamed scores (0 while calibrating)
    alarms: np.ndarray  # [T] bool
    scored_from: int  # first scored row (= calibration steps)

    @property
    def counts(self) -> Counts | None:
        if self.file.labels is None:
            return None
        s = self.scored_from
        return Counts.of(self.file.labels[s:], self.alarms[s:])


def stream_files(model: StreamingAnomalyModel, files: Sequence[SkabFile]) -> list[FileResult]:
    """Stream every file as its own sensor group, all together: one batched step per row index."""
    names = [f"skab{i}" for i in range(len(files))]
    for name in names:
        model.reset(name)
    length = max((len(f.values) for f in files), default=0)
    scores = [np.zeros(len(f.values), np.float32) for f in files]
    alarms = [np.zeros(len(f.values), bool) for f in files]
    for t in range(length):
        tick = {name: f.values[t] for name, f in zip(names, files) if t < len(f.values)}
        result = model.step(tick)
        for i, name in enumerate(names):
            if name in result:
                scores[i][t], alarms[i][t] = result[name].score, result[name].is_anomaly
    for name in names:
        model.reset(name)
    scored_from = model.calibration.steps
    return [FileResult(f, s, a, scored_from) for f, s, a in zip(files, scores, alarms)]


def evaluate(model: StreamingAnomalyModel, files: Sequence[SkabFile]) -> list[FileResult]:
    """The SKAB protocol on ``files``; the model must calibrate on the first 400 rows of each."""
    if model.calibration.steps != PROTOCOL_STEPS:
        log.warning("model calibrates on %d rows; the SKAB protocol uses %d", model.calibration.steps, PROTOCOL_STEPS)
    short = [f.name for f in files if len(f.values) <= model.calibration.steps]
    for name in short:
        log.warning("%s: no rows after the %d calibration rows", name, model.calibration.steps)
    return stream_files(model, files)


def summary(results: Sequence[FileResult]) -> dict[str, float]:
    """Pooled F1/FAR/MAR per folder and over all labelled files, as flat ``<folder>_<metric>`` keys."""
    out: dict[str, float] = {}
    folders = sorted({r.file.folder for r in results})
    for folder in folders:
        counts = [r.counts for r in results if r.file.folder == folder and r.counts is not None]
        if counts:
            out |= {f"{folder}_{k}": v for k, v in pooled(counts).metrics().items()}
    all_counts = [r.counts for r in results if r.counts is not None]
    if all_counts:
        out |= {f"pooled_{k}": v for k, v in pooled(all_counts).metrics().items()}
        out["mean_file_f1"] = float(np.mean([c.f1 for c in all_counts]))
    return out
