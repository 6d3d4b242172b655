"""models.package.series: the generic CSV time-series reader on small written files and on real SKAB / NAB files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from models.package.synthetic import CHANNELS as SKAB_CHANNELS
from models.package.series import count_gaps, gap_flags, parse_time, read_series_csv, sniff_separator
from models.skab import data_root

DATA = data_root()


def write(tmp_path: Path, text: str, name: str = "s.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_skab_like_semicolon_file_with_labels(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "datetime;Pressure;Volume Flow RateRMS;anomaly;changepoint\n"
        "2020-03-09 10:14:33;0.05;32.0;0.0;0.0\n"
        "2020-03-09 10:14:34;0.38;31.5;1.0;1.0\n",
    )
    s = read_series_csv(path, label_column="anomaly")
    assert s.channels == ("Pressure", "VolumeFlowRateRMS")  # changepoint is no channel
    assert s.values.dtype == np.float32 and s.values.shape == (2, 2)
    np.testing.assert_allclose(s.values, [[0.05, 32.0], [0.38, 31.5]], rtol=1e-6)
    assert s.labels is not None and s.labels.tolist() == [False, True]
    assert s.timestamps is not None
    assert s.timestamps[0] == pytest.approx(1583748873.0)  # 2020-03-09 10:14:33 UTC
    assert s.timestamps[1] - s.timestamps[0] == pytest.approx(1.0)
    assert (s.missing, s.gaps, s.name) == (0, 0, "s.csv")


def test_nab_like_file_one_channel(tmp_path: Path) -> None:
    rows = "".join(f"2014-04-01 {h:02d}:00:00,{h * 1.5}\n" for h in range(6))
    s = read_series_csv(write(tmp_path, "timestamp,value\n" + rows), name="realKnownCause/x.csv")
    assert s.channels == ("value",) and s.values.shape == (6, 1)
    assert s.values[:, 0].tolist() == [0.0, 1.5, 3.0, 4.5, 6.0, 7.5]
    assert s.timestamps is not None and np.all(np.diff(s.timestamps) == 3600.0)
    assert s.labels is None and s.name == "realKnownCause/x.csv"


def test_tab_separated_epoch_times_and_64_channels(tmp_path: Path) -> None:
    names = [f"ch{i}" for i in range(64)]
    lines = ["ts\t" + "\t".join(names)]
    lines += [f"{1700000000 + t}\t" + "\t".join(str(t * 100 + i) for i in range(64)) for t in range(5)]
    s = read_series_csv(write(tmp_path, "\n".join(lines) + "\n"))
    assert s.channels == tuple(names) and s.values.shape == (5, 64)
    assert s.values[3, 17] == 317.0
    assert s.timestamps is not None and s.timestamps.tolist() == [1700000000.0 + t for t in range(5)]


def test_columns_picked_by_name_in_the_order_asked(tmp_path: Path) -> None:
    path = write(tmp_path, "time,a,b,c\n0,1,2,3\n1,4,5,6\n")
    s = read_series_csv(path, columns=["c", "a"])
    assert s.channels == ("c", "a")
    assert s.values.tolist() == [[3.0, 1.0], [6.0, 4.0]]


def test_missing_and_unparseable_cells_become_nan_and_are_counted(tmp_path: Path) -> None:
    path = write(tmp_path, "timestamp,a,b\n0,1,\n1,oops,2\n2,3,inf\n3,4\n")
    s = read_series_csv(path)
    assert s.missing == 4  # empty, text, infinite, short row
    assert np.isnan(s.values).sum() == 4
    assert s.values[0, 0] == 1.0 and s.values[2, 0] == 3.0


def test_time_gaps_are_counted(tmp_path: Path) -> None:
    times = [0, 60, 120, 600, 660, 720, 2000, 2060]
    path = write(tmp_path, "timestamp,value\n" + "".join(f"{t},{i}\n" for i, t in enumerate(times)))
    assert read_series_csv(path).gaps == 2


def test_explicit_time_column_and_separator(tmp_path: Path) -> None:
    path = write(tmp_path, "when|x\n2021-01-01T00:00:00Z|1\n2021-01-01T00:00:10Z|2\n")
    s = read_series_csv(path, time_column="when", separator="|")
    assert s.channels == ("x",)
    assert s.timestamps is not None and s.timestamps[1] - s.timestamps[0] == 10.0


def test_no_time_column(tmp_path: Path) -> None:
    s = read_series_csv(write(tmp_path, "a;b\n1;2\n3;4\n"))
    assert s.timestamps is None and s.gaps == 0 and s.channels == ("a", "b")
    assert read_series_csv(write(tmp_path, "ts,a\n1,2\n", "t.csv"), time_column=None).channels == ("ts", "a")


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "timestamp,value\n0,1\n")
    with pytest.raises(ValueError, match=r"s\.csv.*'pressure' not found"):
        read_series_csv(path, columns=["value", "pressure"])
    with pytest.raises(ValueError, match=r"s\.csv.*time column 'clock' not found"):
        read_series_csv(path, time_column="clock")


def test_no_numeric_columns_and_no_rows_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"t\.csv: no numeric columns"):
        read_series_csv(write(tmp_path, "timestamp,name\n0,pump\n1,fan\n", "t.csv"))
    with pytest.raises(ValueError, match=r"e\.csv: no data rows"):
        read_series_csv(write(tmp_path, "timestamp,value\n", "e.csv"))
    with pytest.raises(ValueError, match=r"z\.csv: no header"):
        read_series_csv(write(tmp_path, "", "z.csv"))


def test_helpers() -> None:
    assert sniff_separator("a;b;c") == ";" and sniff_separator("a\tb") == "\t" and sniff_separator("value") == ","
    assert parse_time("1700000000.5") == 1700000000.5
    assert parse_time("1970-01-01 00:01:00") == 60.0
    assert parse_time("1970-01-01T01:00:00+01:00") == 0.0
    assert math.isnan(parse_time("yesterday")) and math.isnan(parse_time(""))
    assert count_gaps(np.array([0.0, 1.0, 2.0, math.nan, 4.0, 10.0])) == 1  # the NaN time is skipped, 4->10 is a gap
    assert count_gaps(np.array([5.0])) == 0


@pytest.mark.skipif(not (DATA / "skab" / "valve1" / "0.csv").is_file(), reason=f"SKAB data not found under {DATA}")
def test_real_skab_file() -> None:
    s = read_series_csv(DATA / "skab" / "valve1" / "0.csv", label_column="anomaly", name="valve1/0.csv")
    assert s.channels == SKAB_CHANNELS
    assert s.values.shape[1] == 8 and s.values.shape[0] > 1000 and s.missing == 0
    assert s.labels is not None and 0 < s.labels.sum() < len(s.labels)
    assert s.timestamps is not None and np.median(np.diff(s.timestamps)) == 1.0  # SKAB samples at 1 Hz
    free = read_series_csv(DATA / "skab" / "anomaly-free" / "anomaly-free.csv", label_column="anomaly")
    assert free.labels is None and free.channels == SKAB_CHANNELS and len(free.values) == 9405


@pytest.mark.skipif(
    not (DATA / "nab" / "realKnownCause" / "nyc_taxi.csv").is_file(), reason=f"NAB data not found under {DATA}"
)
def test_real_nab_file() -> None:
    s = read_series_csv(DATA / "nab" / "realKnownCause" / "nyc_taxi.csv")
    assert s.channels == ("value",) and s.values.shape[0] > 10000 and s.missing == 0
    assert s.timestamps is not None and np.median(np.diff(s.timestamps)) == 1800.0  # half-hourly taxi counts
    assert s.labels is None


def test_gap_flags_mark_the_row_after_the_gap() -> None:
    flags = gap_flags(np.array([0.0, 1.0, 2.0, 9.0, math.nan, 10.0, 11.0]))
    assert flags.tolist() == [False, False, False, True, False, False, False]
    assert not gap_flags(np.array([], np.float64)).any()
