"""What every ``edgeline`` command shows on its terminal: tables that are never cut, JSON, one-line errors.

A table goes to a terminal as a rich table in which the columns a user decides by (ids, package
ids, scores) are kept on one line, other columns wrapping as needed; on a terminal too narrow for
even those, every column wraps (folds), and nothing is ever cut to "…". Anywhere else (a pipe, a
file, a log) it goes out whole as an aligned markdown table.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import typer
from rich import box
from rich.console import Console, ConsoleOptions, RenderResult
from rich.cells import cell_len
from rich.table import Table
from rich.text import Text

Cell = str | Text
NARROWEST = 6
"""A column that is not a key column is folded no narrower than this (or its own width)."""
MARKDOWN_PAD = 40
"""Markdown cells are padded to align their column up to this width; longer ones run on."""
PROJECT_PACKAGES = frozenset({"edgeline", "edge", "stream", "models", "central", "bench"})


@dataclass(frozen=True)
class Column:
    header: str
    numeric: bool = False
    """Right-aligned."""
    key: bool = False
    """A column users decide by: never wrapped or cut on a terminal (numbers never are; their headers may wrap)."""


class TableOutput:
    """A table that renders as rich on a terminal (see the module), as whole markdown elsewhere."""

    def __init__(self, columns: Sequence[Column | str], rows: Iterable[Sequence[Cell]], title: str = "") -> None:
        self.columns = [c if isinstance(c, Column) else Column(c) for c in columns]
        self.rows = [[c if isinstance(c, Text) else Text(str(c)) for c in row] for row in rows]
        self.title = title

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if not console.is_terminal:
            yield Text(self.markdown(), no_wrap=True, overflow="ignore")
            return
        table = self.rich_table(keys_whole=True)
        if self._narrowest(console, options, table) > options.max_width:
            table = self.rich_table(keys_whole=False)  # too narrow even for the key columns: fold, never cut
        yield table

    def rich_table(self, keys_whole: bool = True) -> Table:
        table = Table(title=self.title or None, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                      collapse_padding=True)
        for column in self.columns:
            table.add_column(column.header, justify="right" if column.numeric else "left",
                             no_wrap=column.key and keys_whole, overflow="fold",
                             min_width=self._least_width(column) if keys_whole else None)
        for row in self.rows:
            table.add_row(*row)
        return table

    def markdown(self) -> str:
        """The table as GitHub markdown, its columns aligned so that it also reads as plain text."""
        cells = [[c.header for c in self.columns]] + [[_markdown_cell(c.plain) for c in row] for row in self.rows]
        widths = [min(MARKDOWN_PAD, max(3, *(len(row[i]) for row in cells))) for i in range(len(self.columns))]
        rule = [("-" * (w - 1) + ":") if c.numeric else "-" * w for c, w in zip(self.columns, widths)]
        lines = [self._line(cells[0], widths, self.columns), self._line(rule, widths, self.columns)]
        lines += [self._line(row, widths, self.columns) for row in cells[1:]]
        return "\n".join(([self.title, ""] if self.title else []) + lines) + "\n"

    @staticmethod
    def _narrowest(console: Console, options: ConsoleOptions, table: Table) -> int:
        """The width the table needs without cutting a key column (rich clamps a measure to the width given)."""
        return console.measure(table, options=options.update_width(10_000)).minimum

    def _least_width(self, column: Column) -> int:
        """A key column's whole width; a numeric one its values' (the header may wrap); another's own
        width up to ``NARROWEST`` (wider ones wrap)."""
        if column.key:
            return self._width(column)
        if column.numeric:
            return self._width(column, header=False)
        return min(self._width(column), NARROWEST)

    def _width(self, column: Column, header: bool = True) -> int:
        index = self.columns.index(column)
        cells = ([Text(column.header)] if header else []) + [row[index] for row in self.rows]
        return max([cell_len(line) for cell in cells for line in cell.plain.splitlines() or [""]] or [1])

    @staticmethod
    def _line(cells: Sequence[str], widths: Sequence[int], columns: Sequence[Column]) -> str:
        padded = (cell.rjust(w) if c.numeric else cell.ljust(w) for cell, w, c in zip(cells, widths, columns))
        return "| " + " | ".join(padded) + " |"


def _markdown_cell(text: str) -> str:
    """One line (a cell's lines joined by ", "), its pipes escaped."""
    return ", ".join(text.splitlines()).replace("|", "\\|")


def print_table(table: TableOutput, console: Console | None = None) -> None:
    """Print a table: rich on a terminal that fits it, whole markdown elsewhere (never cropped)."""
    (console or Console()).print(table, crop=False)


def print_json(data: Any) -> None:
    """Plain JSON on stdout (rich would wrap long strings and break it)."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def fail(message: str, status: int = 2) -> typer.Exit:
    """Print one plain line on stderr (no markup: ``[central]`` stays) and return the exit to raise."""
    Console(stderr=True).print(message, markup=False, highlight=False, soft_wrap=True, style="bold red")
    return typer.Exit(status)


@contextmanager
def needs_extra(command: str, extra: str) -> Iterator[None]:
    """A third-party module missing inside the block becomes one line naming the extra to install, exit 2."""
    try:
        yield
    except ModuleNotFoundError as exc:
        module = (exc.name or "").partition(".")[0]
        if not module or module in PROJECT_PACKAGES:
            raise
        raise fail(f"edgeline {command} needs the '{extra}' extra (no module '{module}'): "
                   f"pip install 'edgeline[{extra}]'") from None
