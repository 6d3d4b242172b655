"""Which rows of a plant's CSVs ``train-anomaly`` trains on (models.anomaly_data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.anomaly_data import MIN_RUN, NormalSelection, channel_names, load_training_data


def write_csv(path: Path, rows: int, labels: list[int] | None = None, columns: str = "a,b,c") -> Path:
    names = columns.split(",")
    header = ["timestamp", *names] + (["label"] if labels is not None else [])
    lines = [",".join(header)]
    for i in range(rows):
        minute, second = divmod(i, 60)
        hour, minute = divmod(minute, 60)
        cells = [f"2024-03-01 {hour:02d}:{minute:02d}:{second:02d}", *(f"{i + k}" for k in range(len(names)))]
        lines.append(",".join(cells + ([str(labels[i])] if labels is not None else [])))
    path.write_text("\n".join(lines) + "\n")
    return path


def load(paths: list[Path], selection: NormalSelection, label: str | None = None):
    return load_training_data(paths, None, "auto", label, None, selection)


def test_the_first_rows_of_every_file_are_the_normal_part(tmp_path: Path) -> None:
    data = load([write_csv(tmp_path / "x.csv", 100), write_csv(tmp_path / "y.csv", 80)], NormalSelection(rows=50))
    assert data.channels == ("a", "b", "c")
    assert [len(p) for p in data.normal] == [50, 50]
    assert data.normal[0][-1].tolist() == [49, 50, 51]
    assert data.summary()["normal_rows"] == 100 and not data.notes


def test_a_time_range_selects_the_rows_inside_it(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "x.csv", 300)
    data = load([path], NormalSelection(start="2024-03-01 00:01:00", end="2024-03-01 00:02:59"))
    (part,) = data.normal
    assert len(part) == 120 and part[0][0] == 60 and part[-1][0] == 179


def test_label_zero_runs_train_and_short_runs_are_dropped(tmp_path: Path) -> None:
    labels = [0] * 100 + [1] * 50 + [0] * (MIN_RUN - 1) + [1] * 10 + [0] * 60
    data = load([write_csv(tmp_path / "x.csv", len(labels), labels)], NormalSelection(), label="label")
    assert [len(p) for p in data.normal] == [100, 60]
    assert len(data.labelled) == 1 and not data.notes


def test_nothing_said_takes_every_row_and_says_so(tmp_path: Path) -> None:
    data = load([write_csv(tmp_path / "x.csv", 40)], NormalSelection())
    assert [len(p) for p in data.normal] == [40]
    assert data.notes and "every row" in data.notes[0]


def test_files_with_other_channels_are_refused_by_name(tmp_path: Path) -> None:
    first = write_csv(tmp_path / "x.csv", 40)
    other = write_csv(tmp_path / "y.csv", 40, columns="a,b,d")
    with pytest.raises(ValueError, match=r"y\.csv: channels a, b, d differ"):
        load([first, other], NormalSelection())


@pytest.mark.parametrize(("selection", "message"), [
    (lambda: NormalSelection(start="2024-03-01 00:00:00"), "go together"),
    (lambda: NormalSelection(rows=5, start="2024-03-01", end="2024-03-02"), "not both"),
])
def test_contradictory_selections_are_refused(selection, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        selection()


def test_a_range_with_no_rows_and_a_missing_path_are_clear_errors(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "x.csv", 40)
    with pytest.raises(ValueError, match="no normal rows"):
        load([path], NormalSelection(start="2030-01-01 00:00:00", end="2030-01-02 00:00:00"))
    with pytest.raises(ValueError, match="no such file"):
        load([tmp_path / "nope.csv"], NormalSelection())
    with pytest.raises(ValueError, match="not a time"):
        load([path], NormalSelection(start="yesterday", end="today"))


def test_missing_cells_are_kept_as_nan_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("timestamp,a,b\n" + "".join(f"2024-03-01 00:00:{i:02d},{i},{'' if i == 3 else i}\n"
                                                for i in range(40)))
    data = load([path], NormalSelection())
    assert np.isnan(data.normal[0][3, 1]) and data.summary()["missing_values"] == 1


def test_column_names_become_channel_names_messages_accept(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("time,Load %,motor temp (C),ok\n" + "".join(f"{i},{i},{i},{i}\n" for i in range(40)))
    data = load([path], NormalSelection())
    assert data.channels == ("Load", "motortemp_C", "ok")  # the reader drops spaces; the rest become '_'
    assert any("'Load%' is channel 'Load'" in note for note in data.notes)
    with pytest.raises(ValueError, match="all become channel 'a'"):
        channel_names(["a%", "a#"])
