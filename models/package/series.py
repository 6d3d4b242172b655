"""Generic CSV time series: any separator, any channel names, an optional time and label column.

One reader for every place that takes a user's sensor CSV (training, offline evaluation, the edge's
``csv`` replay source, the benches): SKAB's ``;`` files, NAB's ``timestamp,value`` files and a
plant's own exports. Column names match after removing spaces (SKAB's ``Volume Flow RateRMS`` is
``VolumeFlowRateRMS``). An empty or unparseable value becomes NaN and is counted, never an error;
a time step longer than 1.5x the median step is counted as a gap. Torch-free.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

TIME_COLUMNS = ("datetime", "timestamp", "time", "ts")
LABEL_COLUMNS = ("anomaly", "changepoint", "label")
SEPARATORS = (",", ";", "\t")
GAP_FACTOR = 1.5


@dataclass(frozen=True)
class Series:
    path: Path
    name: str  # relative name, e.g. "valve1/3.csv" or "realKnownCause/x.csv"
    channels: tuple[str, ...]  # channel names in column order of `values`
    values: np.ndarray  # [T, C] float32; NaN where a value is missing/unparseable
    timestamps: np.ndarray | None  # [T] float64 POSIX seconds, None when no time column
    labels: np.ndarray | None  # [T] bool from the label column, None when none
    missing: int  # values that were empty/unparseable (now NaN)
    gaps: int  # time steps longer than 1.5 x the median step


def column_key(name: str) -> str:
    """The matching key of a column name: spaces removed (``Volume Flow RateRMS`` -> ``VolumeFlowRateRMS``)."""
    return name.strip().replace(" ", "")


def sniff_separator(header: str) -> str:
    """The most frequent of ``,`` ``;`` and tab in the header line (``,`` for a one-column file)."""
    counts = {sep: header.count(sep) for sep in SEPARATORS}
    best = max(SEPARATORS, key=lambda sep: counts[sep])
    return best if counts[best] else ","


def parse_number(cell: str) -> float:
    """A finite float, or NaN when the cell is empty, not a number or infinite."""
    try:
        number = float(cell)
    except ValueError:
        return math.nan
    return number if math.isfinite(number) else math.nan


def parse_time(cell: str) -> float:
    """POSIX seconds from an epoch number or an ISO date-time (naive times are UTC); NaN when neither."""
    text = cell.strip()
    number = parse_number(text) if text else math.nan
    if not math.isnan(number):
        return number
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return math.nan
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def gap_flags(timestamps: np.ndarray) -> np.ndarray:
    """[T] bool: True where the step from the previous known time is longer than ``GAP_FACTOR`` x the
    median positive step (rows with an unparseable time are skipped and never flagged)."""
    flags = np.zeros(len(timestamps), bool)
    known = np.flatnonzero(np.isfinite(timestamps))
    steps = np.diff(timestamps[known])
    positive = steps[steps > 0]
    if positive.size:
        flags[known[1:]] = steps > GAP_FACTOR * float(np.median(positive))
    return flags


def count_gaps(timestamps: np.ndarray) -> int:
    """Steps longer than ``GAP_FACTOR`` x the median positive step (unparseable times are ignored)."""
    return int(np.count_nonzero(gap_flags(timestamps)))


def read_series_csv(
    path: str | Path,
    columns: Sequence[str] | None = None,
    time_column: str | None = "auto",
    label_column: str | None = None,
    separator: str | None = None,
    name: str | None = None,
) -> Series:
    """Read one CSV time series.

    ``columns``: the channels to read, by name (None: every numeric column that is not the time
    column nor a label column). ``time_column``: ``"auto"`` finds one of ``datetime``, ``timestamp``,
    ``time``, ``ts``; None reads no time; a name must exist. ``label_column``: its values > 0.5 are
    anomalous; a file without it (SKAB's anomaly-free recording) gets ``labels=None``.
    ``separator``: None sniffs ``,`` ``;`` or tab from the header.
    """
    path = Path(path)
    header, rows = _read_rows(path, separator)
    index = {column_key(h): i for i, h in enumerate(header)}
    time_at = _time_index(path, index, time_column)
    label_at = index.get(column_key(label_column)) if label_column else None
    if columns is None:
        skip = {time_at, label_at} | {index[k] for k in index if k.lower() in LABEL_COLUMNS}
        picked = [i for i in range(len(header)) if i not in skip and _is_numeric(rows, i)]
        if not picked:
            raise ValueError(f"{path}: no numeric columns (columns: {', '.join(header)})")
        channels = tuple(column_key(header[i]) for i in picked)
    else:
        picked = [_column_index(path, index, header, c) for c in columns]
        channels = tuple(columns)
    values = np.array([[parse_number(_cell(r, i)) for i in picked] for r in rows], np.float32)
    values = values.reshape(len(rows), len(picked))
    timestamps = None if time_at is None else np.array([parse_time(_cell(r, time_at)) for r in rows], np.float64)
    labels = None if label_at is None else np.array([parse_number(_cell(r, label_at)) > 0.5 for r in rows], bool)
    return Series(
        path=path,
        name=name or path.name,
        channels=channels,
        values=values,
        timestamps=timestamps,
        labels=labels,
        missing=int(np.count_nonzero(np.isnan(values))),
        gaps=0 if timestamps is None else count_gaps(timestamps),
    )


def _read_rows(path: Path, separator: str | None) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        first = handle.readline()
        if not first.strip():
            raise ValueError(f"{path}: no header line")
        sep = separator or sniff_separator(first)
        header = next(csv.reader([first], delimiter=sep))
        rows = [row for row in csv.reader(handle, delimiter=sep) if any(cell.strip() for cell in row)]
    if not rows:
        raise ValueError(f"{path}: no data rows")
    return header, rows


def _time_index(path: Path, index: dict[str, int], time_column: str | None) -> int | None:
    if time_column is None:
        return None
    if time_column == "auto":
        lowered = {key.lower(): i for key, i in index.items()}
        return next((lowered[name] for name in TIME_COLUMNS if name in lowered), None)
    at = index.get(column_key(time_column))
    if at is None:
        raise ValueError(f"{path}: time column {time_column!r} not found (columns: {', '.join(index)})")
    return at


def _column_index(path: Path, index: dict[str, int], header: list[str], column: str) -> int:
    at = index.get(column_key(column))
    if at is None:
        raise ValueError(f"{path}: column {column!r} not found (columns: {', '.join(header)})")
    return at


def _cell(row: list[str], at: int) -> str:
    return row[at] if at < len(row) else ""


def _is_numeric(rows: list[list[str]], at: int) -> bool:
    """At least half the non-empty cells of the column are numbers (a few bad cells become NaN)."""
    filled = [cell for row in rows if (cell := _cell(row, at).strip())]
    parsed = sum(not math.isnan(parse_number(cell)) for cell in filled)
    return bool(filled) and 2 * parsed >= len(filled)
