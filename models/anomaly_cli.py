"""``edgeline models eval-skab`` and ``edgeline models train-anomaly``; mounted with :func:`register`.

``eval-skab`` needs no torch: it streams every SKAB-format CSV under a folder through
:class:`models.package.anomaly.StreamingAnomalyModel` on ONNX Runtime (each file one sensor group, per-group
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
        from models.package import ModelLoadError, PackageError, StreamingAnomalyModel, load_package
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
        built = model.package.manifest.metrics
        if {"cv_f1", "cv_far", "cv_mar"} <= built.keys():
            console.print(f"cross-validated when the package was built (setting chosen on other files): F1 "
                          f"{built['cv_f1']:.3f}, FAR {built['cv_far']:.3f}, MAR {built['cv_mar']:.3f}", soft_wrap=True)

    @app.command("train-anomaly")
    def train_anomaly(
        files: Annotated[list[Path], typer.Argument(help="your CSV files, or folders of them (searched recursively)",
                                                    show_default=False)],
        name: Annotated[str, typer.Option(help="package name (what the site's models catalog refers to)")],
        version: Annotated[str, typer.Option(help="package version")] = "1.0.0",
        out: Annotated[Path, typer.Option(help="folder to write the package folder into")] = Path("packages"),
        columns: Annotated[str | None, typer.Option(help="channel columns, comma-separated (default: every numeric "
                                                    "column but the time and label columns)")] = None,
        time_column: Annotated[str, typer.Option(help="time column ('auto': datetime, timestamp, time or ts; "
                                                 "'none': rows are equally spaced)")] = "auto",
        separator: Annotated[str | None, typer.Option(help="column separator (default: sniffed: , ; or tab)")] = None,
        label_column: Annotated[str | None, typer.Option(help="0/1 column marking anomalous rows: rows labelled 0 "
                                                         "train the model, labelled files are evaluated")] = None,
        normal_rows: Annotated[int | None, typer.Option(min=1, help="the first N rows of every file are normal "
                                                        "(train on these only)")] = None,
        normal_from: Annotated[str | None, typer.Option(help="start of a normal time range (ISO time), with "
                                                        "--normal-to")] = None,
        normal_to: Annotated[str | None, typer.Option(help="end of the normal time range (ISO time)")] = None,
        calibration_steps: Annotated[int | None, typer.Option(min=1, help="samples each sensor group calibrates "
                                                              "on at run time (default: the recipe's)")] = None,
        max_false_alarms_per_day: Annotated[float | None, typer.Option(min=0.0, help="false-alarm budget that "
                                                                       "sets each group's threshold")] = None,
        steps: Annotated[int | None, typer.Option(min=1, help="training steps (default: the recipe's)")] = None,
        key: Annotated[Path | None, typer.Option(help="Ed25519 private key that signs the package (default "
                                                 "$EDGELINE_SIGNING_KEY or ~/.config/edgeline/signing.key, "
                                                 "created on first use)")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    ) -> None:
        """Train an anomaly model on your own sensor CSVs: train, export, parity, calibrate, evaluate, package, sign.

        Needs the models extra (torch). What is normal: --normal-rows, or --normal-from/--normal-to, or
        the rows a --label-column marks 0; with none of them every row is taken as normal.
        """
        from models.anomaly_data import NormalSelection, load_training_data

        with needs_extra("models train-anomaly", "models"):
            import torch  # noqa: F401 - fail before reading the data, not after

        try:
            selection = NormalSelection(rows=normal_rows, start=normal_from, end=normal_to)
            data = load_training_data(files, _split(columns), time_column, label_column, separator, selection)
        except ValueError as exc:
            raise fail(str(exc)) from None
        for line in data.notes:
            Console(stderr=True).print(f"note: {line}", markup=False, style="yellow", soft_wrap=True)
        with needs_extra("models train-anomaly", "models"):
            package = _build_and_sign(data, name, version, out, calibration_steps, max_false_alarms_per_day, steps,
                                      key, progress=not as_json)
        report = data.summary() | {"package": package.ref, "folder": str(package.folder), "key_id": package.key_id,
                                   "metrics": package.manifest.metrics}
        if as_json:
            print_json(report)
            return
        _print_training_report(report)


def _split(columns: str | None) -> list[str] | None:
    return [c.strip() for c in columns.split(",") if c.strip()] if columns else None


def _build_and_sign(data: Any, name: str, version: str, out: Path, calibration_steps: int | None,
                    budget: float | None, steps: int | None, key: Path | None, progress: bool) -> Any:
    """Train and package (torch), then sign with the plant's key (created on first use)."""
    from dataclasses import replace

    from models.anomaly import Recipe, build_anomaly_package
    from models.package import PackageError, SigningError, ensure_signing_key, sign_package

    recipe = Recipe() if steps is None else replace(Recipe(), steps=steps)
    overrides = {k: v for k, v in {"calibration_steps": calibration_steps,
                                   "max_false_alarms_per_day": budget}.items() if v is not None}
    try:
        package = build_anomaly_package(data.normal, data.channels, name=name, version=version, out_dir=out,
                                        recipe=recipe, evaluate=data.labelled or None, postprocess=overrides,
                                        progress=progress)
        private_key, created = ensure_signing_key(key)
        if created:
            Console(stderr=True).print(f"note: created signing key {created} (its public half: {created}.pub; "
                                       "add that to signatures.trusted_keys)", markup=False, soft_wrap=True)
        return sign_package(package.folder, private_key)
    except (ValueError, PackageError, SigningError, OSError) as exc:
        raise fail(str(exc)) from None


def _print_training_report(report: dict[str, Any]) -> None:
    console = Console()
    metrics = report["metrics"]
    rows = [[k, f"{v:.4g}"] for k, v in sorted(metrics.items())]
    print_table(TableOutput([Column("metric", key=True), Column("value", numeric=True)], rows,
                            f"{report['package']}: {', '.join(report['channels'])}"), console)
    console.print(f"{report['package']} -> {report['folder']} (signed by {report['key_id']}); trained on "
                  f"{report['normal_rows']} normal rows of {report['files']} file(s)", soft_wrap=True)
