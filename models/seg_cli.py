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


def class_table(rows: list[dict[str, Any]]) -> TableOutput:
    """One row per class: images, pooled IoU, share flagged (recall; false alarms for Free), precision, AP."""
    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    return TableOutput([Column("class", key=True), Column("images", numeric=True), Column("iou", numeric=True),
                        Column("flagged", numeric=True), Column("precision", numeric=True),
                        Column("ap", numeric=True)],
                       [[r["class"], str(r["images"]), num(r["iou"]), num(r["flagged"]), num(r["precision"]),
                         num(r["average_precision"])] for r in rows],
                       "per class (flagged: image recall; on Free, the false-alarm rate)")


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


_SEEN_NOTE = ("note: this package trained on every shared tile but a calibration share of defect-free ones, so on "
              "the shared tiles these figures are on images it saw; its held-out figures are the 5-fold "
              "cross-validation of its recipe {recipe!r} in its manifest (metrics cv_*)")


def _saw_the_shared_tiles(package) -> bool:
    """A shipped build (its manifest names the cross-validated recipe) trained on the shared tiles."""
    return bool(package.manifest.training.get("cv_recipe"))


def _check_resume(save_checkpoint: Path | None, resume: bool) -> None:
    """An interrupted run is continued only when asked, and never silently overwritten."""
    if resume and save_checkpoint is None:
        raise fail("--resume needs --save-checkpoint PATH (the run continues from PATH's .run.pt)")
    from models.segmentation import run_file

    run = run_file(save_checkpoint)
    if run is not None and run.exists() and not resume:
        raise fail(f"{run} holds an interrupted run: add --resume to continue it, or delete it "
                   f"to start again")


def register(app: typer.Typer) -> None:
    """Add ``train-seg``, ``eval-seg`` and ``quantize`` to ``app``."""

    @app.command("train-seg")
    def train_seg(
        out: Annotated[Path, typer.Option(help="folder that receives <name>-{fp32,int8,fp16}")] = Path("models/packages"),
        preset: Annotated[str, typer.Option(help="default (the shipped seg-tiles: native resolution, the "
                                                 "cross-validated recipe, ~25 min on 2 CPU cores), fixed256 (the "
                                                 "previous seg-tiles, 256x256) or synthetic (seg-synth, the demo's "
                                                 "model, ~3 min)")] = "default",
        epochs: Annotated[Optional[int], typer.Option(min=1, help="training epochs (default: the preset's)")] = None,
        time_budget: Annotated[Optional[float], typer.Option(help="stop training after this many seconds")] = None,
        seed: Annotated[int, typer.Option(help="seed of sampling, augmentation and init")] = 0,
        device: Annotated[str, typer.Option(help="torch device that trains: cpu, cuda")] = "cpu",
        threads: Annotated[int, typer.Option(min=1, help="torch and ONNX Runtime threads")] = 2,
        max_iou_drop: Annotated[float, typer.Option(help="int8 gate: largest val IoU drop vs fp32")] = 0.01,
        checkpoint: Annotated[Optional[Path], typer.Option(help="package these trained weights instead of "
                                                                "training (from --save-checkpoint)")] = None,
        save_checkpoint: Annotated[Optional[Path], typer.Option(help="keep the trained weights here; while it "
                                                                     "trains, a resumable <name>.run.pt beside them "
                                                                     "is rewritten every few minutes")] = None,
        resume: Annotated[bool, typer.Option(help="continue the interrupted run in <save-checkpoint>.run.pt")] = False,
        progress: Annotated[bool, typer.Option(help="rich progress bar")] = True,
        as_json: JsonOption = False,
    ) -> None:
        """Train seg-tiles (magnetic tiles) or seg-synth; export fp32 (parity-checked), int8 (gated), fp16.

        Long runs: ``nohup edgeline models train-seg --save-checkpoint w.pt &``; killed, the same
        command with ``--resume`` goes on from the last checkpoint."""
        if preset != "synthetic":
            _data_or_exit()
        with needs_extra("models train-seg", "models"):
            from models.quantize import QualityGateError
            from models.segmentation import ParityError, build_segmentation_packages
            from models.segmentation import preset as make_config
        _check_resume(save_checkpoint, resume)
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
        except ValueError as exc:  # a run file of another recipe, or no CV results for the shipped recipe
            raise fail(str(exc)) from None
        _report(packages["fp32"].manifest.name, list(packages.values()), as_json)

    @app.command("eval-seg")
    def eval_seg(
        package: Annotated[Path, typer.Argument(help="a segmentation package folder")],
        data: Annotated[Optional[Path], typer.Option(help="evaluate every image of this folder (MT_<Class>/<stem>.jpg "
                                                       "+ <stem>.png, or MT_<Class>/Imgs/...) with the package's own "
                                                       "alarm, instead of a val split")] = None,
        dataset: Annotated[Optional[str], typer.Option(help="without --data: tiles (the magnetic-tile val split, the "
                                                            "alarm calibrated on train; default) or synthetic (fresh "
                                                            "synthetic cameras)")] = None,
        threads: Annotated[int, typer.Option(min=1, help="ONNX Runtime intra-op threads")] = 2,
        val_fraction: Annotated[float, typer.Option(help="val share of each class (must match training)")] = 0.2,
        max_false_alarms: Annotated[float, typer.Option(min=0, max=1, help="without --data: false-alarm budget on the "
                                                                           "train Free images")] = 0.05,
        overlays: Annotated[Optional[Path], typer.Option(help="write the worst and best defect images (frame | truth "
                                                              "| prediction) and pr_curve.png here")] = None,
        overlay_count: Annotated[int, typer.Option(min=1, help="N: the worst N and the best N images")] = 6,
        as_json: JsonOption = False,
    ) -> None:
        """Run a package through the edge runtime on a folder of tiles (--data) or a val split; pooled
        defect IoU, per class, image recall, false alarms, precision-recall per class."""
        from models import seg_eval, tiles

        pkg = _load(package)
        if pkg.manifest.task != "segmentation":
            raise fail(f"{package}: task is {pkg.manifest.task!r}, not segmentation")
        if data is not None:
            if dataset is not None:
                raise fail("give --data or --dataset, not both")
            try:
                evaluation = seg_eval.evaluate_folder(pkg, data, threads)
            except tiles.DataLayoutError as exc:
                raise fail(str(exc)) from None
            source = str(data)
        else:
            dataset = dataset or "tiles"
            if dataset == "tiles":
                _data_or_exit()
                train_items, val_items = tiles.load_split(val_fraction)
                train, val = tiles.ImageSet.from_items(train_items), seg_eval.samples_from_items(val_items)
            else:
                train_set, val_set = _dataset_or_exit(dataset, val_fraction)
                train, val = train_set, seg_eval.samples_from_set(val_set)
            evaluation = seg_eval.evaluate_split(pkg, train, val, threads, max_false_alarms,
                                                 with_synthetic=dataset == "tiles")
            source = f"{dataset} val"
        written = seg_eval.write_overlays(evaluation, overlays, overlay_count) if overlays is not None else []
        package_id = pkg.manifest.package_id
        if as_json:
            out = {"package": package_id, "dataset": None if data is not None else dataset,
                   "data": str(data) if data is not None else None, "images": len(evaluation.samples),
                   "classes": evaluation.classes, "alarm": evaluation.alarm.describe(),
                   "alarm_source": "package" if data is not None else "calibrated on train",
                   "metrics": evaluation.metrics,
                   "pr_curves": {cls: c.as_dict() for cls, c in evaluation.curves.items()},
                   "overlays": [str(p) for p in written]}
            if data is None:
                out["val_frames"] = len(evaluation.samples)
            out["trained_on_every_shared_tile"] = _saw_the_shared_tiles(pkg)
            print_json(out)
            return
        title = f"{package_id} on {len(evaluation.samples)} images of {source}"
        print_table(metrics_table(title, {package_id: evaluation.metrics}), console)
        print_table(class_table(evaluation.class_rows()), console)
        how = "the package's own" if data is not None else f"calibrated on train at {max_false_alarms:g} false alarms"
        console.print(f"image alarm ({how}): {evaluation.alarm.describe()}", soft_wrap=True, highlight=False,
                      markup=False)
        if tiles.FREE not in evaluation.classes:
            console.print(f"no MT_{tiles.FREE} images: false alarms, precision and AP are not measured",
                          soft_wrap=True, highlight=False, markup=False)
        if not any(cls != tiles.FREE for cls in evaluation.classes):
            console.print("no defect images: recall, defect IoU and AP are not measured", soft_wrap=True,
                          highlight=False, markup=False)
        unknown = [cls for cls in evaluation.classes if cls not in tiles.CLASSES]
        if unknown:
            console.print(f"classes outside {', '.join(tiles.CLASSES)} (counted as defects): {', '.join(unknown)}",
                          soft_wrap=True, highlight=False, markup=False)
        if written:
            console.print(f"{len(written)} pictures -> {overlays}", soft_wrap=True, highlight=False, markup=False)
        if _saw_the_shared_tiles(pkg) and data is None and dataset == "tiles":
            console.print(_SEEN_NOTE.format(recipe=pkg.manifest.training["cv_recipe"]), soft_wrap=True,
                          highlight=False, markup=False)

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
