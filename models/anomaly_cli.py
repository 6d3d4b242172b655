"""``edgeline models eval-skab`` and ``edgeline models train-anomaly``; mounted with :func:`register`.

``eval-skab`` needs no torch: it streams every SKAB-format CSV under a folder through
:class:`edge.anomaly.StreamingAnomalyModel` on ONNX Runtime (each file one sensor group, per-group
calibration on its first rows) and prints F1/FAR/MAR per file, per folder and pooled.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = Path(__file__).resolve().parent / "packages" / "anomaly-skab"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def results_tables(results: list, title: str) -> list[Table]:
    """Rich tables: one row per file, then one per folder and the pooled total."""
    from models.skab import pooled

    files = Table(title=f"{title}: per file")
    files.add_column("file", no_wrap=True, min_width=max((len(r.file.name) for r in results), default=4))
    for column in ("rows", "scored", "anomalous", "alarms", "F1", "FAR", "MAR"):
        files.add_column(column, justify="right")
    for r in results:
        scored = r.alarms[r.scored_from:]
        counts = r.counts
        labelled = counts is not None
        files.add_row(
            r.file.name, str(len(r.file.values)), str(len(scored)),
            str(counts.tp + counts.fn) if labelled else "-", str(int(scored.sum())),
            _fmt(counts.f1 if labelled else None), _fmt(counts.far if labelled else None),
            _fmt(counts.mar if labelled else None),
        )
    folders = Table(title=f"{title}: per folder (pooled over its files)")
    for column in ("folder", "files", "scored rows", "F1", "FAR", "MAR"):
        folders.add_column(column, justify="left" if column == "folder" else "right")
    names = sorted({r.file.folder for r in results})
    groups = [(name, [r for r in results if r.file.folder == name]) for name in names] + [("TOTAL", list(results))]
    for name, group in groups:
        counts = [r.counts for r in group if r.counts is not None]
        total = pooled(counts) if counts else None
        folders.add_row(name, str(len(group)), str(total.rows) if total else "-",
                        _fmt(total.f1 if total else None), _fmt(total.far if total else None),
                        _fmt(total.mar if total else None), end_section=name == names[-1])
    return [files, folders]


def register(app: typer.Typer) -> None:
    """Add ``eval-skab`` and ``train-anomaly`` to a typer app (the ``edgeline models`` group)."""

    @app.command("eval-skab")
    def eval_skab(
        path: Annotated[Path, typer.Argument(help="a SKAB-format CSV or a folder of them (searched recursively)")],
        package: Annotated[Path, typer.Option("--package", "-p", help="anomaly model package folder")] = DEFAULT_PACKAGE,
        calibration_steps: Annotated[int, typer.Option(help="calibration rows per file (SKAB protocol: 400)")] = 400,
        profile: Annotated[str | None, typer.Option(help="postprocess profile of the package")] = None,
    ) -> None:
        """Score SKAB files with the SKAB protocol through the edge runtime (ONNX Runtime, no torch)."""
        from edge.anomaly import StreamingAnomalyModel
        from edge.inference import ModelLoadError
        from models.package import PackageError, load_package
        from models.skab import evaluate, load_folder, summary

        console = Console()
        if not path.exists():
            console.print(f"[red]{path}: no such file or folder[/]")
            raise typer.Exit(2)
        try:
            model = StreamingAnomalyModel(load_package(package), calibration_steps=calibration_steps, profile=profile)
        except (PackageError, ModelLoadError, ValueError) as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(2) from None
        files = load_folder(path)
        for f in files:
            if f.labels is None:
                console.print(f"[yellow]warning: {f.name} has no 'anomaly' column: scored, no F1[/]")
        if not files:
            console.print(f"[red]{path}: no SKAB-format CSV files[/]")
            raise typer.Exit(1)
        results = evaluate(model, files)
        for table in results_tables(results, f"{model.package.ref} on {path}"):
            console.print(table)
        pooled_f1 = summary(results).get("pooled_f1")
        if pooled_f1 is not None:
            console.print(f"pooled F1 {pooled_f1:.3f} over {sum(r.counts is not None for r in results)} labelled files "
                          f"({calibration_steps} calibration rows each)")

    @app.command("train-anomaly")
    def train_anomaly(
        out: Annotated[Path, typer.Option(help="folder to write the package folder into")] = DEFAULT_PACKAGE.parent,
        data: Annotated[Path | None, typer.Option(help="SKAB root (default $EDGELINE_DATA/skab)")] = None,
    ) -> None:
        """Train, export, evaluate and package anomaly-skab (needs the models extra: torch)."""
        try:
            import torch
        except ImportError:
            Console().print("[red]train-anomaly needs torch: install the 'models' extra[/]")
            raise typer.Exit(2) from None
        from models.anomaly import build_anomaly_package

        torch.set_num_threads(1)
        package = build_anomaly_package(out, progress=True, data=data)
        shown = {k: round(v, 4) for k, v in package.manifest.metrics.items()}
        Console().print(f"{package.ref} -> {package.folder}\n{shown}")
