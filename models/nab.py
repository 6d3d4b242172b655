"""NAB (Numenta Anomaly Benchmark) files, labelled windows, and its scoring, for binary alarms.

Protocol (NAB's): the first rows of each file are a probation period, ``min(floor(0.15 n), 0.15 x
5000)`` rows as NAB's sweeper computes it (15 %, capped at 750 rows for files over 5,000 rows); a
detector may learn normal behaviour there, and nothing in it is scored. Per file we count:

* windows detected: a labelled window with at least one alarm on a scored row inside it;
* false-positive alarm events: a run of consecutive alarmed scored rows outside every window
  counts once (the tail of an alarm that outlives its window is one such event);
* alarmed rows (the figure for the ``artificialNoAnomaly`` files, which have no window).

The NAB score follows ``nab/sweeper.py`` of numenta/NAB (v1.1) at a fixed threshold, with
alarms as the detections: a window's reward is the largest weighted scaled sigmoid of the
relative position of its alarms (``A_TP`` for an alarm on the window's first row, falling to 0
at its last), a window without an alarm costs ``A_FN``, and EVERY alarmed row outside the windows
costs ``A_FP`` times the scaled sigmoid of its distance past the previous window's end (the full
``A_FP`` before the first window or 3 window lengths after one). Alarm EVENTS (an alert per run of
alarmed rows, what an operator sees) are also scored with only each run's first row as the
detection (``nab_score_onsets``): NAB's literal rule charges every alarmed row, so one long
event costs as much as hundreds of separate false alerts. The corpus score is normalised
as NAB's runner does: ``100 (S - S_null) / (S_perfect - S_null)`` with the null detector (no alarm:
NAB's constant-score null detector at its best threshold) and ``S_perfect = A_TP x windows``.
NAB optimises every detector's threshold on the whole corpus before scoring; here each
detector's threshold comes from its own calibration, so the figures are not tuned on the labels.

Data: ``$EDGELINE_DATA/nab`` (default ``<repo>/../shared/data/nab``), from github.com/numenta/NAB
(MIT; not copied into this repository). Torch-free.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.package import Series, parse_time, read_series_csv
from models.skab import data_root

PROBATION_PERCENT = 0.15
PROBATION_CAP_ROWS = 5000  # NAB caps probation at PROBATION_PERCENT x 5000 rows
WINDOWS_FILE = "combined_windows.json"
CATEGORIES = ("realKnownCause", "realAWSCloudwatch", "artificialWithAnomaly", "artificialNoAnomaly")


@dataclass(frozen=True)
class CostMatrix:
    """An application profile's weights (NAB's ``config/profiles.json``)."""

    tp: float
    fp: float
    fn: float


STANDARD = CostMatrix(tp=1.0, fp=0.11, fn=1.0)


def nab_root() -> Path:
    return data_root() / "nab"


def probation_rows(rows: int, percent: float = PROBATION_PERCENT) -> int:
    """NAB's probationary length: ``min(floor(percent x rows), percent x 5000)``."""
    return int(min(math.floor(percent * rows), percent * PROBATION_CAP_ROWS))


@dataclass(frozen=True)
class NabFile:
    series: Series
    windows: tuple[tuple[int, int], ...]  # labelled windows as inclusive row ranges (first, last)

    @property
    def name(self) -> str:
        return self.series.name

    @property
    def category(self) -> str:
        return self.name.split("/", 1)[0]

    @property
    def values(self) -> np.ndarray:
        return self.series.values

    @property
    def probation(self) -> int:
        return probation_rows(len(self.values))

    @property
    def in_window(self) -> np.ndarray:
        """[T] bool: the row lies inside a labelled window."""
        mask = np.zeros(len(self.values), bool)
        for first, last in self.windows:
            mask[first : last + 1] = True
        return mask


def read_windows(path: Path) -> dict[str, list[tuple[float, float]]]:
    """``combined_windows.json``: file name -> windows as (start, end) POSIX seconds, both inclusive."""
    raw = json.loads(Path(path).read_text())
    return {name: [(parse_time(a), parse_time(b)) for a, b in windows] for name, windows in raw.items()}


def window_rows(timestamps: np.ndarray, limits: Iterable[tuple[float, float]],
                name: str = "") -> tuple[tuple[int, int], ...]:
    """Windows in POSIX seconds as inclusive row ranges: the rows with ``start <= t <= end``."""
    out = []
    for start, end in limits:
        first = int(np.searchsorted(timestamps, start, "left"))
        last = int(np.searchsorted(timestamps, end, "right")) - 1
        if last < first:
            raise ValueError(f"{name}: window [{start}, {end}] holds no row")
        out.append((first, last))
    return tuple(sorted(out))


def load_corpus(root: Path | None = None, categories: Sequence[str] | None = None,
                per_category: int | None = None) -> list[NabFile]:
    """The labelled NAB files under ``root`` (those named in its windows file and present), by
    category then name; ``per_category`` keeps only the first few of each category."""
    root = Path(root or nab_root())
    windows = read_windows(root / WINDOWS_FILE)
    wanted = categories or CATEGORIES
    out: list[NabFile] = []
    for category in wanted:
        names = sorted(n for n in windows if n.split("/", 1)[0] == category and (root / n).is_file())
        for name in names[:per_category]:
            series = read_series_csv(root / name, name=name)
            if series.timestamps is None or series.values.shape[1] != 1:
                raise ValueError(f"{root / name}: expected NAB's timestamp,value columns")
            out.append(NabFile(series, window_rows(series.timestamps, windows[name], name)))
    return out


# ---------------------------------------------------------------- counting


def runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """Runs of consecutive True as half-open (start, end) intervals."""
    padded = np.concatenate([[False], np.asarray(flags, bool), [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def onsets(alarms: np.ndarray) -> np.ndarray:
    """[T] bool: the first row of every run of consecutive alarms."""
    alarms = np.asarray(alarms, bool)
    return alarms & ~np.concatenate([[False], alarms[:-1]])


def scaled_sigmoid(position: np.ndarray) -> np.ndarray:
    """NAB's sweeper: ``2 sigmoid(-5 x) - 1``, and -1 from x = 3 (well past a window) on."""
    x = np.asarray(position, np.float64)
    return np.where(x >= 3.0, -1.0, 2.0 / (1.0 + np.exp(5.0 * x)) - 1.0)


def sweep_weights(rows: int, windows: Sequence[tuple[int, int]], costs: CostMatrix = STANDARD) -> np.ndarray:
    """[rows] what an alarm on each row is worth (NAB's ``sweepScore``): inside a window the
    weighted scaled sigmoid of its relative position ``-(last - i + 1) / width``, divided by its
    value on the first row (so an alarm there earns exactly ``A_TP``); outside, ``A_FP`` times the
    scaled sigmoid of the distance past the previous window's end in (width - 1) units, or
    ``-A_FP`` before the first window. ``windows`` sorted, not overlapping."""
    index = np.arange(rows, dtype=np.float64)
    weights = np.full(rows, -costs.fp)
    max_tp = float(scaled_sigmoid(np.float64(-1.0)))
    stops = [first for first, _ in windows[1:]] + [rows]
    for (first, last), stop in zip(windows, stops):
        width = last - first + 1
        if width < 2:
            raise ValueError("NAB's scorer is undefined for a one-row window")
        inside = index[first : last + 1]
        weights[first : last + 1] = scaled_sigmoid(-(last - inside + 1) / width) * costs.tp / max_tp
        weights[last + 1 : stop] = scaled_sigmoid((index[last + 1 : stop] - last) / (width - 1)) * costs.fp
    return weights


def nab_raw_score(alarms: np.ndarray, windows: Sequence[tuple[int, int]], probation: int,
                  costs: CostMatrix = STANDARD) -> float:
    """One file's raw NAB score for binary alarms (rows before ``probation`` ignored): the sum of
    the weights of the alarms outside the windows, plus per window the best weight of its alarms
    or ``-A_FN`` when it has none; a window wholly inside the probation period is not scored."""
    alarms = np.asarray(alarms, bool).copy()
    alarms[:probation] = False
    weights = sweep_weights(len(alarms), windows, costs)
    inside = np.zeros(len(alarms), bool)
    for first, last in windows:
        inside[first : last + 1] = True
    score = float(weights[alarms & ~inside].sum())
    for first, last in windows:
        if last < probation:
            continue
        hits = weights[max(first, probation) : last + 1][alarms[max(first, probation) : last + 1]]
        score += float(hits.max()) if len(hits) else -costs.fn
    return score


@dataclass(frozen=True)
class FileOutcome:
    name: str
    windows: int  # labelled windows
    detected: int  # windows with an alarm on a scored row
    fp_events: int  # runs of alarmed scored rows outside every window
    alarmed_rows: int  # alarmed scored rows
    scored_rows: int
    nab_raw: float
    nab_null: float  # the null detector's (no alarm) raw score on this file
    nab_onset_raw: float  # raw score with only each alarm run's first row as a detection

    @property
    def category(self) -> str:
        return self.name.split("/", 1)[0]


def outcome(file: NabFile, alarms: np.ndarray, costs: CostMatrix = STANDARD) -> FileOutcome:
    """Everything the bench reports of one file's alarms ([T] bool, probation rows ignored)."""
    scored = np.asarray(alarms, bool).copy()
    scored[: file.probation] = False
    detected = sum(bool(scored[first : last + 1].any()) for first, last in file.windows)
    none = np.zeros(len(scored), bool)
    return FileOutcome(
        file.name, len(file.windows), detected, len(runs(scored & ~file.in_window)), int(scored.sum()),
        len(scored) - file.probation, nab_raw_score(scored, file.windows, file.probation, costs),
        nab_raw_score(none, file.windows, file.probation, costs),
        nab_raw_score(onsets(scored), file.windows, file.probation, costs))


def nab_score(outcomes: Sequence[FileOutcome], costs: CostMatrix = STANDARD, use_onsets: bool = False) -> float:
    """The normalised corpus score, 0 = the null detector, 100 = every window on its first row, no
    FP; ``use_onsets``: of the alarm runs' first rows only."""
    raw = sum(o.nab_onset_raw if use_onsets else o.nab_raw for o in outcomes)
    null = sum(o.nab_null for o in outcomes)
    perfect = costs.tp * sum(o.windows for o in outcomes)
    return 100.0 * (raw - null) / (perfect - null) if perfect != null else float("nan")


def summary(outcomes: Sequence[FileOutcome], costs: CostMatrix = STANDARD) -> dict[str, float]:
    """Windows detected (count and share), FP events per file, alarmed rows, NAB scores."""
    windows = sum(o.windows for o in outcomes)
    detected = sum(o.detected for o in outcomes)
    return {"files": float(len(outcomes)), "windows": float(windows), "detected": float(detected),
            "detected_share": detected / windows if windows else float("nan"),
            "fp_events_per_file": float(np.mean([o.fp_events for o in outcomes])) if outcomes else float("nan"),
            "alarmed_rows": float(sum(o.alarmed_rows for o in outcomes)),
            "alarmed_share": sum(o.alarmed_rows for o in outcomes) / max(1, sum(o.scored_rows for o in outcomes)),
            "nab_score": nab_score(outcomes, costs) if windows else float("nan"),
            "nab_score_onsets": nab_score(outcomes, costs, use_onsets=True) if windows else float("nan")}
