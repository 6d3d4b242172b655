"""``edgeline models train-seg | eval-seg | quantize``: the seg-tiles commands.

Mounted by ``edgeline.cli`` through :func:`register`. ``eval-seg`` runs on ONNX Runtime alone;
``quantize`` also needs onnx and ``train-seg`` torch (the ``models`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from stream.console import Column, TableOutput, fail, needs_extra, print_json, print_table

console = Console()
JsonOption = Annotated[bool, typer.Option("--json", help="print the metrics as JSON instead of a table")]


def metrics_table(title: str, rows: dict[str, dict[str, float]]) -> TableOutput:
    """One column per package (its id, with the precision), one row per metric."""
    keys = sorted({k for metrics in rows.values() for k in metrics})
    return TableOutput([Column("metric", key=True)] + [Column(name, numeric=True, key=True) for name in rows],
                       [[key, *(f"{rows[n][key]:.4g}" if key in rows[n] else "-" for n in rows)] for key in keys],
                       title)


def _report(title: str, packages: list[Any], as_json: bool, extra: dict[str, dict[str, float]] | None = None) -> None:
    """The packages' metrics (``extra``: more columns first, e.g. the fp32 one quantized) and where they are."""
    rows = (extra or {}) | {p.manifest.package_id: p.manifest.metrics for p in packages}
    if as_json:
        print_json({"metrics": rows, "packages": {p.manifest.package_id: str(p.folder) for p in packages}})
        return
    print_table(metrics_table(title, rows), console)
    for package in packages:
        console.print(f"{package.manifest.package_id} -> {package.folder}", soft_wrap=True, highlight=False)


def _load(path: Path):
    from models.package import PackageError, load_package

    try:
        return load_package(path)
    except PackageError as exc:
        raise fail(str(exc)) from None


def _data_or_exit() -> None:
    from models import tiles

    if not tiles.tiles_available():
        raise fail(f"magnetic-tile data not found under {tiles.tiles_dir()} "
                   f"(set EDGELINE_DATA; source: {tiles.SOURCE})")


def _dataset_or_exit(dataset: str, val_fraction: float):
    from models import tiles

    if dataset == "tiles":
        _data_or_exit()
    try:
        return tiles.load_dataset(dataset, val_fraction)
    except ValueError as exc:
        raise fail(str(exc)) from None


def register(app: typer.Typer) -> None:
    """Add ``train-seg``, ``eval-seg`` and ``quantize`` to ``app``."""

    @app.command("train-seg")
    def train_seg(
        out: Annotated[Path, typer.Option(help="folder that receives <name>-{fp32,int8,fp16}")] = Path("models/packages"),
        preset: Annotated[str, typer.Option(help="default (seg-tiles, ~18 min on 2 CPU cores), quality (seg-tiles, "
                                                 "12k steps: the shipped packages) or synthetic (seg-synth, the "
                                                 "demo's model, ~3 min)")] = "default",
        epochs: Annotated[Optional[int], typer.Option(min=1, help="training epochs (default: the preset's)")] = None,
        time_budget: Annotated[Optional[float], typer.Option(help="stop training after this many seconds")] = None,
        seed: Annotated[int, typer.Option(help="seed of sampling, augmentation and init")] = 0,
        device: Annotated[str, typer.Option(help="torch device that trains: cpu, cuda")] = "cpu",
        threads: Annotated[int, typer.Option(min=1, help="torch and ONNX Runtime threads")] = 2,
        max_iou_drop: Annotated[float, typer.Option(help="int8 gate: largest val IoU drop vs fp32")] = 0.01,
        checkpoint: Annotated[Optional[Path], typer.Option(help="package these trained weights instead of "
                                                                "training (from --save-checkpoint)")] = None,
        save_checkpoint: Annotated[Optional[Path], typer.Option(help="keep the trained weights here")] = None,
        progress: Annotated[bool, typer.Option(help="rich progress bar")] = True,
        as_json: JsonOption = False,
    ) -> None:
        """Train seg-tiles (magnetic tiles) or seg-synth; export fp32 (parity-checked), int8 (gated), fp16."""
        if preset != "synthetic":
            _data_or_exit()
        with needs_extra("models train-seg", "models"):
            from models.quantize import QualityGateError
            from models.segmentation import ParityError, build_segmentation_packages
            from models.segmentation import preset as make_config
        updates: dict = {"seed": seed, "max_iou_drop": max_iou_drop, "device": device, "threads": threads}
        if epochs is not None:
            updates["epochs"] = epochs
        if time_budget is not None:
            updates["max_train_seconds"] = time_budget
        try:
            config = make_config(preset, **updates)
        except ValueError as exc:
            raise fail(str(exc)) from None
        try:
            packages = build_segmentation_packages(out, config, progress=progress, checkpoint=checkpoint,
                                                   save_to=save_checkpoint)
        except (QualityGateError, ParityError) as exc:
            raise fail(str(exc), status=1) from None
        _report(packages["fp32"].manifest.name, list(packages.values()), as_json)

    @app.command("eval-seg")
    def eval_seg(
        package: Annotated[Path, typer.Argument(help="a segmentation package folder")],
        dataset: Annotated[str, typer.Option(help="tiles (the magnetic-tile val split) or synthetic (fresh "
                                                  "synthetic cameras)")] = "tiles",
        threads: Annotated[int, typer.Option(min=1, help="ONNX Runtime intra-op threads")] = 2,
        val_fraction: Annotated[float, typer.Option(help="val share of each class (must match training)")] = 0.2,
        as_json: JsonOption = False,
    ) -> None:
        """Run a package through the edge runtime on a val set; the image alarm is calibrated on train."""
        from models import tiles

        pkg = _load(package)
        train, val = _dataset_or_exit(dataset, val_fraction)
        metrics = tiles.evaluate_package(pkg, train, val, threads, with_synthetic=dataset == "tiles")
        package_id = pkg.manifest.package_id
        if as_json:
            print_json({"package": package_id, "dataset": dataset, "val_frames": len(val), "metrics": metrics})
            return
        print_table(metrics_table(f"{package_id} on {len(val)} {dataset} val frames", {package_id: metrics}), console)

    @app.command("quantize")
    def quantize(
        package: Annotated[Path, typer.Argument(help="an fp32 segmentation package folder")],
        out: Annotated[Optional[Path], typer.Option(help="where to write; default: beside the fp32 package")] = None,
        max_iou_drop: Annotated[float, typer.Option(help="gate: largest val IoU drop vs fp32")] = 0.01,
        calib_frames: Annotated[int, typer.Option(min=1, help="train frames used for calibration")] = 64,
        threads: Annotated[int, typer.Option(min=1, help="ONNX Runtime intra-op threads")] = 2,
        fp16: Annotated[bool, typer.Option(help="also write the fp16 package")] = True,
        dataset: Annotated[str, typer.Option(help="what the model was trained on: tiles or synthetic")] = "tiles",
        as_json: JsonOption = False,
    ) -> None:
        """fp32 package -> int8 (static QDQ, only if within the IoU gate) and fp16 packages."""
        with needs_extra("models quantize", "models"):
            from models.quantize import QualityGateError, quantize_packages

        pkg = _load(package)
        if pkg.manifest.precision != "fp32" or pkg.manifest.task != "segmentation":
            raise fail(f"{package}: need an fp32 segmentation package")
        name = pkg.manifest.name
        try:
            packages = quantize_packages(pkg, out or package.parent, max_iou_drop=max_iou_drop,
                                         calib_frames=calib_frames, threads=threads, fp16=fp16,
                                         data=_dataset_or_exit(dataset, 0.2))
        except QualityGateError as exc:
            raise fail(str(exc), status=1) from None
        _report(name, list(packages.values()), as_json, {pkg.manifest.package_id: pkg.manifest.metrics})
