"""Shared output of the benchmarks: a rich table on the terminal and a JSON file."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "cores": psutil.cpu_count(logical=True),
            "python": platform.python_version(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def report(name: str, title: str, rows: list[dict[str, Any]], notes: str = "", out: Path | None = None) -> Path:
    """Print ``rows`` as a table and write them, with the machine, to ``bench/results/<name>.json``."""
    table = Table(title=title)
    for column in rows[0]:
        table.add_column(column, justify="right" if isinstance(rows[0][column], (int, float)) else "left")
    for row in rows:
        table.add_row(*(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()))
    console = Console()
    console.print(table)
    if notes:
        console.print(notes)
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), "rows": rows, "notes": notes}, indent=2))
    console.print(f"wrote {path}")
    return path
