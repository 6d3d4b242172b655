"""``edgeline models eval-skab`` and ``edgeline models train-anomaly``; mounted with :func:`register`.

``eval-skab`` needs no torch: it streams every SKAB-format CSV under a folder through
:class:`edge.anomaly.StreamingAnomalyModel` on ONNX Runtime (each file one sensor group, per-group
calibration on its first rows) and prints F1/FAR/MAR per file, per folder and pooled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from stream.console import Column, TableOutput, fail, needs_extra, print_json, print_table

DEFAULT_PACKAGE = Path(__file__).resolve().parent / "packages" / "anomaly-skab"
RATES = ("f1", "far", "mar")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _rates(counts: Any) -> dict[str, float | None]:
    return {k: (getattr(counts, k) if counts is not None else None) for k in RATES}


def results_rows(results: list) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One row per file, then one per folder and the pooled ``TOTAL`` (F1/FAR/MAR None where unlabelled)."""
    from models.skab import pooled

    files = []
    for r in results:
        scored, counts = r.alarms[r.scored_from:], r.counts
        files.append({"file": r.file.name, "rows": len(r.file.values), "scored": len(scored),
                      "anomalous": counts.tp + counts.fn if counts is not None else None,
                      "alarms": int(scored.sum()), **_rates(counts)})
    names = sorted({r.file.folder for r in results})
    groups = [(name, [r for r in results if r.file.folder == name]) for name in names] + [("TOTAL", list(results))]
    folders = []
    for name, group in groups:
        counts = [r.counts for r in group if r.counts is not None]
        total = pooled(counts) if counts else None
        folders.append({"folder": name, "files": len(group), "scored_rows": total.rows if total else None,
                        **_rates(total)})
    return files, folders


def results_tables(results: list, title: str) -> list[TableOutput]:
    """The per-file and per-folder tables; F1/FAR/MAR are never cut."""
    files, folders = results_rows(results)
    rates = [Column(k.upper(), numeric=True, key=True) for k in RATES]
    counted = [Column(k, numeric=True) for k in ("rows", "scored", "anomalous", "alarms")]
    return [
        TableOutput([Column("file", key=True), *counted, *rates],
                    [[f["file"], *(_count(f[c.header]) for c in counted), *(_fmt(f[k]) for k in RATES)] for f in files],
                    f"{title}: per file"),
        TableOutput([Column("folder", key=True), Column("files", numeric=True), Column("scored rows", numeric=True),
                     *rates],
                    [[f["folder"], str(f["files"]), _count(f["scored_rows"]), *(_fmt(f[k]) for k in RATES)]
                     for f in folders],
                    f"{title}: per folder (pooled over its files)"),
    ]


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def register(app: typer.Typer) -> None:
    """Add ``eval-skab`` and ``train-anomaly`` to a typer app (the ``edgeline models`` group)."""

    @app.command("eval-skab")
    def eval_skab(
        path: Annotated[Path, typer.Argument(help="a SKAB-format CSV or a folder of them (searched recursively)")],
        package: Annotated[Path, typer.Option("--package", "-p", help="anomaly model package folder")] = DEFAULT_PACKAGE,
        calibration_steps: Annotated[int, typer.Option(help="calibration rows per file (SKAB protocol: 400)")] = 400,
        profile: Annotated[str | None, typer.Option(help="postprocess profile of the package")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="print the results as JSON instead of tables")] = False,
    ) -> None:
        """Score SKAB files with the SKAB protocol through the edge runtime (ONNX Runtime, no torch)."""
        from edge.anomaly import StreamingAnomalyModel
        from edge.inference import ModelLoadError
        from models.package import PackageError, load_package
        from models.skab import evaluate, load_folder, summary

        if not path.exists():
            raise fail(f"{path}: no such file or folder")
        try:
            model = StreamingAnomalyModel(load_package(package), calibration_steps=calibration_steps, profile=profile)
        except (PackageError, ModelLoadError, ValueError) as exc:
            raise fail(str(exc)) from None
        files = load_folder(path)
        for f in files:
            if f.labels is None:
                Console(stderr=True).print(f"warning: {f.name} has no 'anomaly' column: scored, no F1", markup=False,
                                           style="yellow", soft_wrap=True)
        if not files:
            raise fail(f"{path}: no SKAB-format CSV files", status=1)
        results = evaluate(model, files)
        pooled_f1 = summary(results).get("pooled_f1")
        labelled = sum(r.counts is not None for r in results)
        if as_json:
            per_file, per_folder = results_rows(results)
            print_json({"package": model.package.manifest.package_id, "path": str(path),
                        "calibration_steps": calibration_steps, "pooled_f1": pooled_f1, "labelled_files": labelled,
                        "files": per_file, "folders": per_folder})
            return
        console = Console()
        for table in results_tables(results, f"{model.package.manifest.package_id} on {path}"):
            print_table(table, console)
        if pooled_f1 is not None:
            console.print(f"pooled F1 {pooled_f1:.3f} over {labelled} labelled files "
                          f"({calibration_steps} calibration rows each)", soft_wrap=True)

    @app.command("train-anomaly")
    def train_anomaly(
        out: Annotated[Path, typer.Option(help="folder to write the package folder into")] = DEFAULT_PACKAGE.parent,
        data: Annotated[Path | None, typer.Option(help="SKAB root (default $EDGELINE_DATA/skab)")] = None,
    ) -> None:
        """Train, export, evaluate and package anomaly-skab (needs the models extra: torch)."""
        with needs_extra("models train-anomaly", "models"):
            import torch

            from models.anomaly import build_anomaly_package

            torch.set_num_threads(1)
            package = build_anomaly_package(out, progress=True, data=data)
        shown = {k: round(v, 4) for k, v in package.manifest.metrics.items()}
        Console().print(f"{package.manifest.package_id} -> {package.folder}\n{shown}", soft_wrap=True)
