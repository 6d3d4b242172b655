"""Shared output of the benchmarks: a table on the terminal (whole when piped) and a JSON file."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console

from stream.console import Column, TableOutput, print_table

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "cores": psutil.cpu_count(logical=True),
            "python": platform.python_version(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def report(name: str, title: str, rows: list[dict[str, Any]], notes: str = "", out: Path | None = None) -> Path:
    """Print ``rows`` as a table and write them, with the machine, to ``bench/results/<name>.json``."""
    console = Console()
    print_rows(title, rows, console)
    if notes:
        console.print(notes, markup=False, highlight=False, soft_wrap=True)
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), "rows": rows, "notes": notes}, indent=2))
    console.print(f"wrote {path}", markup=False, highlight=False, soft_wrap=True)
    return path


def print_rows(title: str, rows: list[dict[str, Any]], console: Console | None = None) -> None:
    """One row per dict, one column per key (numbers right-aligned, floats to 3 significant digits)."""
    columns = [Column(name, numeric=isinstance(value, (int, float))) for name, value in rows[0].items()]
    print_table(TableOutput(columns, [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()]
                                      for row in rows], title), console)
