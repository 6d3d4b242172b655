"""The commands' shared table printer: whole when piped, key columns never cut on an 80-column
terminal, and missing extras reported in one line."""

from __future__ import annotations

import io

import pytest
import typer
from rich.console import Console
from rich.text import Text

from stream.console import Column, TableOutput, needs_extra, print_table

LONG_FAILURE = "; ".join(["gate latency: m01 p95 40.1 ms is 2.01x the old 20.0 ms (limit 1.2x)"] * 2)


def rollouts_table() -> TableOutput:
    columns = [Column("rollout", key=True), Column("package", key=True), Column("previous", key=True), "phase",
               Column("stage", numeric=True)]
    rows = [["0123456789ab", "seg-synth-1.0.0-fp32", "seg-synth-1.0.0-int8", "rolled_back", "1/3"],
            ["ba9876543210", "seg-tiles-1.0.0-int8", "seg-tiles-1.0.0-fp32", "completed (paused)", "3/3"]]
    return TableOutput(columns, rows, "Rollouts")


def printed(table: TableOutput, *, terminal: bool, width: int) -> str:
    out = io.StringIO()
    print_table(table, Console(file=out, force_terminal=terminal, width=width, color_system=None))
    return out.getvalue()


def test_piped_tables_are_whole_markdown_however_narrow_the_console():
    text = printed(TableOutput([Column("id", key=True), "failure"], [["r1", LONG_FAILURE]]), terminal=False,
                   width=40)
    assert "…" not in text
    assert f"| r1  | {LONG_FAILURE} |" in text  # one line, not wrapped at 40 columns
    assert "| --- | " in text


def test_an_80_column_terminal_keeps_every_key_column_whole():
    text = printed(rollouts_table(), terminal=True, width=80)
    assert "|" not in text and "…" not in text  # a rich table, not the markdown fallback
    for value in ("0123456789ab", "seg-synth-1.0.0-fp32", "seg-synth-1.0.0-int8", "seg-tiles-1.0.0-int8"):
        assert value in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_a_terminal_too_narrow_for_the_key_columns_folds_them_instead_of_cutting():
    text = printed(rollouts_table(), terminal=True, width=50)
    assert "…" not in text and "|" not in text
    assert max(len(line) for line in text.splitlines()) <= 50  # a live view is cropped past the width
    assert "012345678" in text and "seg-synth" in text


def test_markdown_cells_are_escaped_and_multi_line_cells_joined():
    table = TableOutput([Column("machine", key=True), Column("models", key=True), Column("n", numeric=True)],
                        [["m1", "seg=a|b\nanomaly=c", Text("7", style="red")]])
    assert table.markdown().splitlines() == ["| machine | models              |   n |",
                                             "| ------- | ------------------- | --: |",
                                             "| m1      | seg=a\\|b, anomaly=c |   7 |"]


def test_a_missing_third_party_module_names_the_extra(capsys):
    with pytest.raises(typer.Exit) as exited, needs_extra("central serve", "central"):
        raise ModuleNotFoundError("No module named 'fastapi'", name="fastapi.routing")
    assert exited.value.exit_code == 2
    assert capsys.readouterr().err.strip() == ("edgeline central serve needs the 'central' extra (no module "
                                               "'fastapi'): pip install 'edgeline[central]'")


def test_a_missing_module_of_the_project_itself_is_a_bug_not_an_extra():
    with pytest.raises(ModuleNotFoundError), needs_extra("central serve", "central"):
        raise ModuleNotFoundError("No module named 'central.nope'", name="central.nope")
