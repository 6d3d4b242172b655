"""What ``edgeline models train-anomaly`` trains on: a plant's own CSV files, and which of their rows are normal.

No torch here. The files are read with :func:`models.package.series.read_series_csv` (any separator, a time
column, channel columns by name); every file must have the same channels. The normal rows come from
the first choice that applies:

1. ``--normal-rows N``: the first N rows of every file;
2. ``--normal-from/--normal-to``: the rows whose time falls in that range (needs a time column);
3. a label column: every run of rows labelled 0 (runs shorter than :data:`MIN_RUN` are dropped: a
   forecaster learns nothing from them);
4. nothing said: every row (a note says so).

Each normal part is its own series, so the model never learns the jump across a cut. Files with
labels are evaluated on after training (calibrated on their first rows, as the edge does).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.package import Series, parse_time, read_series_csv, runs
from models.skab import find_files

MIN_RUN = 32
"""Shortest normal run kept for training (samples)."""


@dataclass(frozen=True)
class NormalSelection:
    rows: int | None = None
    start: str | None = None  # ISO time
    end: str | None = None

    def __post_init__(self) -> None:
        if (self.start is None) != (self.end is None):
            raise ValueError("--normal-from and --normal-to go together")
        if self.rows is not None and self.start is not None:
            raise ValueError("give --normal-rows or --normal-from/--normal-to, not both")

    def parts(self, series: Series) -> list[np.ndarray]:
        """The normal parts of one file, each [T, C]."""
        if self.rows is not None:
            return [series.values[: self.rows]]
        if self.start is not None:
            return [series.values[self._time_mask(series)]]
        if series.labels is not None:
            return [series.values[s:e] for s, e in runs(~series.labels) if e - s >= MIN_RUN]
        return [series.values]

    def _time_mask(self, series: Series) -> np.ndarray:
        if series.timestamps is None:
            raise ValueError(f"{series.path}: --normal-from/--normal-to need a time column")
        start, end = _epoch(self.start), _epoch(self.end)
        if end <= start:
            raise ValueError(f"--normal-to {self.end} is not after --normal-from {self.start}")
        return (series.timestamps >= start) & (series.timestamps <= end)


@dataclass
class TrainingData:
    channels: tuple[str, ...]
    files: list[Series]
    normal: list[np.ndarray]
    labelled: list[Series]
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"channels": list(self.channels), "files": len(self.files),
                "normal_rows": int(sum(len(part) for part in self.normal)),
                "labelled_files": len(self.labelled),
                "missing_values": int(sum(f.missing for f in self.files)),
                "time_gaps": int(sum(f.gaps for f in self.files))}


def load_training_data(paths: Sequence[Path], columns: Sequence[str] | None, time_column: str,
                       label_column: str | None, separator: str | None, selection: NormalSelection) -> TrainingData:
    """Read every CSV under ``paths`` and select its normal rows; ValueError names what is wrong."""
    files = [_read(path, base, columns, time_column, label_column, separator) for path, base in _expand(paths)]
    if not files:
        raise ValueError(f"no CSV files in {', '.join(map(str, paths))}")
    channels = channel_names(files[0].channels)
    for f in files[1:]:
        if f.channels != channels:
            raise ValueError(f"{f.path}: channels {', '.join(f.channels)} differ from {files[0].path}'s "
                             f"({', '.join(channels)}); pass --columns to pick the same ones")
    normal = [part for f in files for part in selection.parts(f) if len(part)]
    data = TrainingData(channels, files, normal, [f for f in files if f.labels is not None])
    data.notes += [f"column {column!r} is channel {channel!r} (site file: {{name: {channel}, column: {column!r}}})"
                   for column, channel in zip(files[0].channels, channels) if column != channel]
    if not normal:
        raise ValueError("no normal rows selected: check --normal-rows, --normal-from/--normal-to or the labels")
    if selection.rows is None and selection.start is None and label_column is None:
        data.notes.append("no --normal-rows, --normal-from/--normal-to or --label-column: every row is taken as normal")
    return data


def channel_names(columns: Sequence[str]) -> tuple[str, ...]:
    """Channel names for column names: what messages and topics accept (letters, digits, ``_ . -``; 64 at most)."""
    names = tuple((re.sub(r"[^A-Za-z0-9_.-]+", "_", c).strip("_.-") or "channel")[:64] for c in columns)
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ValueError(f"columns {', '.join(c for c, n in zip(columns, names) if n in clashes)} all become "
                         f"channel {clashes[0]!r}: rename them or pick with --columns")
    return names


def _read(path: Path, base: Path, columns: Sequence[str] | None, time_column: str, label_column: str | None,
          separator: str | None) -> Series:
    time = None if time_column == "none" else time_column
    return read_series_csv(path, columns=columns, time_column=time, label_column=label_column, separator=separator,
                           name=path.relative_to(base).as_posix())


def _expand(paths: Sequence[Path]) -> list[tuple[Path, Path]]:
    out = []
    for path in paths:
        if not path.exists():
            raise ValueError(f"{path}: no such file or folder")
        base = path.parent if path.is_file() else path
        out += [(found, base) for found in find_files(path)]
    return out


def _epoch(text: str) -> float:
    """An ISO time (or epoch seconds) as POSIX seconds, read like the CSV time column (no zone: UTC)."""
    value = parse_time(text)
    if np.isnan(value):
        raise ValueError(f"{text!r} is not a time (e.g. 2024-03-01 08:00:00)")
    return value
