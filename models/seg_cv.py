"""5-fold cross-validation of seg-tiles recipes on the shared magnetic tiles.

Folds are fixed by a seed and stratified by class (each class shuffled with ``FOLD_SEED``, then
dealt round-robin). For fold k the net trains on the other four folds, less a calibration share
of their defect-free tiles (``CALIB_FRACTION``, by name hash) that it never sees: the image alarm's
threshold is set on those at the false-alarm budget, as the shipped package's is. The held-out
fold is then scored through the edge runtime (ONNX export, :class:`models.package.session.SegmentationModel`,
each tile at its own size). Every recipe choice is made on the mean over the five folds.

    python -m models.seg_cv run --recipe baseline            # resumable: finished folds are kept
    python -m models.seg_cv report                           # mean ± std per recipe and class

Fold results (per-image scores, small) go to ``bench/results/seg_cv/<recipe>/fold<k>.json``;
checkpoints and fold weights to ``--work`` (default ``~/.cache/edgeline/seg_cv``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from models import tiles
from models.tiles import FREE, ImageScore, TileItem

log = logging.getLogger(__name__)

FOLDS = 5
FOLD_SEED = 15
CALIB_FRACTION = 0.2
MAX_FALSE_ALARMS = 0.05
RESULTS = tiles.REPO_ROOT / "bench" / "results" / "seg_cv"
WORK = Path.home() / ".cache" / "edgeline" / "seg_cv"

BUDGET = {"epochs": 4, "steps_per_epoch": 500, "batch": 8, "lr": 1e-3, "eval_every": 100,
          "max_train_seconds": 3 * 3600.0}
"""2,000 steps of 8 crops per fold: ~6 min at one thread beside another run, so four recipes x
five folds take about an hour on 2 cores. Short: the figures compare recipes, they are not what
a longer run reaches; the shipped net trains longer on all tiles with the chosen recipe."""

RECIPES: dict[str, dict] = {
    # the previous seg-tiles recipe (1.1.0): every tile resized to 256x256; the reference of native
    "fixed256": {"resize": "fixed", "size": 256},
    # today's recipe, moved to native resolution (each tile at its own size, 128 px crops of it)
    "baseline": {"resize": "native", "scale_range": (0.8, 1.25)},
    # one change at a time against the baseline:
    "balanced": {"resize": "native", "scale_range": (0.8, 1.25), "sampling": "class_balanced",
                 "defect_centred": 0.8, "hard_negatives": 0.3},
    "focal_tversky": {"resize": "native", "scale_range": (0.8, 1.25), "loss": "focal_tversky"},
    "surface_aug": {"resize": "native", "scale_range": (0.8, 1.25), "blur": 0.3, "noise": 0.05, "gamma": 0.3},
}


def assign_folds(items: list[TileItem], folds: int = FOLDS, seed: int = FOLD_SEED) -> list[int]:
    """The fold of each item: per class, a seeded shuffle dealt round-robin (so every fold holds a
    fifth of every class, and adding a class moves no other)."""
    assignment = [0] * len(items)
    for cls in sorted({item.cls for item in items}):
        members = sorted((i for i, item in enumerate(items) if item.cls == cls), key=lambda i: items[i].image.name)
        order = np.random.default_rng([seed, sum(cls.encode())]).permutation(len(members))
        for rank, position in enumerate(order):
            assignment[members[position]] = rank % folds
    return assignment


def fold_split(items: list[TileItem], fold: int) -> tuple[list[TileItem], list[TileItem], list[TileItem]]:
    """(train, calibration, test) of ``fold``: calibration = defect-free tiles of the other folds
    whose name hash falls in the lowest ``CALIB_FRACTION``."""
    assignment = assign_folds(items)
    test = [item for item, f in zip(items, assignment) if f == fold]
    train, calib = split_calibration([item for item, f in zip(items, assignment) if f != fold])
    return train, calib, test


def split_calibration(items: list[TileItem]) -> tuple[list[TileItem], list[TileItem]]:
    """(train, calibration): the defect-free tiles whose name hash falls in the lowest
    ``CALIB_FRACTION`` are kept from training, to set the image alarm on tiles the net never saw."""
    calib = [item for item in items if item.cls == FREE and tiles.in_val(item.image.name, CALIB_FRACTION, "calib")]
    chosen = {item.image for item in calib}
    return [item for item in items if item.image not in chosen], calib


def dataset_sha256(items: list[TileItem]) -> str:
    """One hash of the images and masks (class, name and bytes of each), in a fixed order: what a
    package's manifest records of the data it was trained on."""
    digest = hashlib.sha256()
    for item in sorted(items, key=lambda it: (it.cls, it.image.name)):
        for path in (item.image, item.mask):
            digest.update(f"{item.cls}/{path.name}:".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def recipe_config(recipe: str, threads: int = 1, **updates):
    from models.segmentation import SegTrainConfig

    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r} (choose from {', '.join(RECIPES)})")
    return SegTrainConfig(**(BUDGET | RECIPES[recipe] | {"threads": threads} | updates))


def run_fold(recipe: str, fold: int, threads: int = 1, work: Path = WORK, results: Path = RESULTS,
             root: Path | None = None) -> dict:
    """Train fold ``fold`` of ``recipe`` (resuming a checkpoint), score its held-out tiles and the
    calibration tiles through the edge runtime, and write ``<results>/<recipe>/fold<k>.json``."""
    from models import segmentation as seg

    config = recipe_config(recipe, threads)
    train_items, _, _ = fold_split(tiles.list_items(root), fold)
    started = time.perf_counter()
    weights = fold_weights(recipe, fold, work)
    if weights.exists():
        _, result = seg.load_checkpoint(weights)
    else:
        train_set = seg.FrameSet.from_set(tiles.ImageSet.from_items(train_items), seg.preprocess_spec(config))
        result = seg.train(config, train_set, seg.FrameSet([], [], []), resume_from=work / recipe / f"fold{fold}-run.pt")
        seg.save_checkpoint(weights, config, result)
    report = score_fold(seg.export_for(result.model, config), config, fold, threads, root=root)
    report |= {"recipe": recipe, "steps": result.steps, "train_seconds": result.seconds,
               "seconds": time.perf_counter() - started}
    write_fold(report, recipe, fold, results)
    return report


def fold_weights(recipe: str, fold: int, work: Path = WORK) -> Path:
    """Where fold ``fold`` of ``recipe`` keeps its finished weights (pruning and distillation start there)."""
    return work / recipe / f"fold{fold}.pt"


def score_fold(onnx_bytes: bytes, config, fold: int, threads: int = 1, precision: str = "fp32",
               root: Path | None = None) -> dict:
    """Score a graph on fold ``fold``'s held-out and calibration tiles through the edge runtime."""
    from models import segmentation as seg
    from models.package import SegmentationModel, write_package

    _, calib_items, test_items = fold_split(tiles.list_items(root), fold)
    with tempfile.TemporaryDirectory() as tmp:
        package = write_package(Path(tmp) / "pkg", seg.make_manifest(config, precision), onnx_bytes)
        model = SegmentationModel(package, threads=threads)
        test, calib = tiles.ImageSet.from_items(test_items), tiles.ImageSet.from_items(calib_items)
        return {"fold": fold, "config": config.model_dump(mode="json"), "precision": precision,
                "test": _scored(tiles.score_set(model, test), test_items),
                "calib": _scored(tiles.score_set(model, calib), calib_items)}


def write_fold(report: dict, variant: str, fold: int, results: Path = RESULTS) -> Path:
    out = results / variant / f"fold{fold}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return out


def _scored(scores: list[ImageScore], items: list[TileItem]) -> list[dict]:
    return [asdict(score) | {"stem": item.image.stem} for score, item in zip(scores, items)]


def _scores(rows: list[dict]) -> list[ImageScore]:
    return [ImageScore(**{k: tuple(v) if isinstance(v, list) else v for k, v in row.items() if k != "stem"})
            for row in rows]


# ---------------------------------------------------------------- figures


def alarm_rules() -> list[str]:
    """Image-alarm rules compared: ``top<k>`` (mean of the k highest probabilities) and
    ``area@<t>`` (share of pixels above t)."""
    return [f"top{k}" for k in tiles.TOP_K] + [f"area@{t}" for t in tiles.ALARM_THRESHOLDS]


def rule_alarm(rule: str, threshold: float = 0.0) -> tiles.Alarm:
    """The :class:`models.tiles.Alarm` of a rule name of :func:`alarm_rules`."""
    if rule.startswith("top"):
        return tiles.Alarm(tiles.TOP_K.index(int(rule[3:])), threshold, "top_k")
    return tiles.Alarm(tiles.ALARM_THRESHOLDS.index(float(rule.split("@")[1])), threshold, "area")


def image_score(score: ImageScore, rule: str) -> float:
    return rule_alarm(rule).score(score)


def calibrated_alarm(rule: str, calib: list[ImageScore], max_false_alarms: float = MAX_FALSE_ALARMS) -> tiles.Alarm:
    """``rule`` with the threshold that keeps these defect-free tiles within the false-alarm budget."""
    return rule_alarm(rule, tiles.calibrate_area_threshold([image_score(s, rule) for s in calib], max_false_alarms))


def fold_metrics(report: dict, max_false_alarms: float = MAX_FALSE_ALARMS) -> dict[str, float]:
    """One fold's figures: pooled IoU over defect images and over all, dice, IoU per class, and for
    every alarm rule the recall and false-alarm rate on the held-out fold at the threshold set on
    the calibration tiles (plus the recall at the held-out Free tiles' own 5 % point, the curve's)."""
    test, calib = _scores(report["test"]), _scores(report["calib"])
    defect = [s for s in test if s.cls != FREE]
    free = [s for s in test if s.cls == FREE]
    out = {"iou_defect_images": _pooled_iou(defect), "iou": _pooled_iou(test),
           "dice": 2 * sum(s.inter for s in test) / max(1, sum(s.pred_area + s.true_area for s in test))}
    for cls in tiles.DEFECT_CLASSES:
        out[f"iou_{cls.lower()}"] = _pooled_iou([s for s in defect if s.cls == cls])
    for rule in alarm_rules():
        alarm = calibrated_alarm(rule, calib, max_false_alarms)
        out[f"recall[{rule}]"] = float(np.mean([alarm.fires(s) for s in defect]))
        out[f"false_alarms[{rule}]"] = float(np.mean([alarm.fires(s) for s in free]))
        own = tiles.calibrate_area_threshold([image_score(s, rule) for s in free], max_false_alarms)
        out[f"recall_at_5pct[{rule}]"] = float(np.mean([image_score(s, rule) > own for s in defect]))
    return out


def _pooled_iou(scores: list[ImageScore]) -> float:
    union = sum(s.union for s in scores)
    return sum(s.inter for s in scores) / union if union else float("nan")


def recipe_summary(recipe: str, results: Path | None = None) -> dict:
    """Mean and std over the folds found for ``recipe``; the alarm rule with the best mean recall."""
    results = results or RESULTS
    reports = [json.loads(path.read_text()) for path in sorted((results / recipe).glob("fold*.json"))]
    if not reports:
        return recorded(recipe)
    per_fold = [fold_metrics(report) for report in reports]
    keys = per_fold[0].keys() if per_fold else []
    mean = {k: float(np.nanmean([m[k] for m in per_fold])) for k in keys}
    std = {k: float(np.nanstd([m[k] for m in per_fold])) for k in keys}
    best = max(alarm_rules(), key=lambda rule: mean.get(f"recall[{rule}]", -1.0)) if per_fold else None
    return {"recipe": recipe, "folds": [r["fold"] for r in reports], "steps": [r["steps"] for r in reports],
            "mean": mean, "std": std, "alarm_rule": best}


RECORD = tiles.REPO_ROOT / "models" / "seg_cv.json"
"""The summaries of the cross-validation runs behind the shipped recipe and its variants,
committed: a fresh clone reports them and builds the shipped package without rerunning them
(``python -m models.seg_cv report --record`` rewrites it from the fold files here)."""


def recorded(recipe: str) -> dict:
    """``recipe``'s summary from :data:`RECORD` (no folds, no alarm rule when it is not there)."""
    record = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    return record.get(recipe) or {"recipe": recipe, "folds": [], "steps": [], "mean": {}, "std": {},
                                  "alarm_rule": None}


def variants_found(results: Path | None = None) -> list[str]:
    """Every recipe or variant with fold files under ``results``, then those only in :data:`RECORD`."""
    results = results or RESULTS
    here = sorted(p.name for p in results.iterdir() if p.is_dir() and any(p.glob("fold*.json"))) \
        if results.is_dir() else []
    record = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    return here + [name for name in record if name not in here]


HEADLINE = ["iou_defect_images", *(f"iou_{c.lower()}" for c in tiles.DEFECT_CLASSES), "dice"]


def print_report(recipes: list[str], results: Path = RESULTS) -> dict[str, dict]:
    """A table readable in a log: one row per recipe, mean ± std over its folds."""
    summaries = {r: recipe_summary(r, results) for r in recipes}
    width = max([15, *(len(name) + 1 for name in summaries)])
    header = f"{'recipe':<{width}}{'folds':>6}  " + "  ".join(f"{k.replace('iou_', ''):>13}" for k in HEADLINE)
    header += f"  {'alarm rule':>10}  {'recall':>13}  {'false alarms':>13}"
    print(header)
    for name, summary in summaries.items():
        mean, std, rule = summary["mean"], summary["std"], summary["alarm_rule"]
        if rule is None:
            continue
        cells = [f"{mean[k]:.3f}±{std[k]:.3f}" for k in HEADLINE]
        cells += [f"{rule:>10}", f"{mean[f'recall[{rule}]']:.3f}±{std[f'recall[{rule}]']:.3f}",
                  f"{mean[f'false_alarms[{rule}]']:.3f}±{std[f'false_alarms[{rule}]']:.3f}"]
        print(f"{name:<{width}}{len(summary['folds']):>6}  " + "  ".join(f"{c:>13}" for c in cells))
    return summaries


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.seg_cv", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and score folds of a recipe (finished folds are skipped)")
    run.add_argument("--recipe", required=True, choices=list(RECIPES))
    run.add_argument("--folds", default=",".join(map(str, range(FOLDS))), help="comma-separated fold numbers")
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--work", type=Path, default=WORK)
    report = sub.add_parser("report", help="mean ± std over folds, per recipe")
    report.add_argument("--recipes", help="comma-separated (default: every one found here or recorded)")
    report.add_argument("--json", type=Path, help="also write the summaries here")
    report.add_argument("--record", action="store_true", help=f"rewrite {RECORD.name} from the fold files here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command == "run":
        for fold in (int(f) for f in args.folds.split(",")):
            if (RESULTS / args.recipe / f"fold{fold}.json").exists():
                log.info("%s fold %d: done before, kept", args.recipe, fold)
                continue
            report_ = run_fold(args.recipe, fold, args.threads, args.work)
            log.info("%s fold %d: %s", args.recipe, fold,
                     {k: round(v, 3) for k, v in fold_metrics(report_).items() if "[" not in k})
        return
    summaries = print_report(args.recipes.split(",") if args.recipes else variants_found())
    if args.json:
        args.json.write_text(json.dumps(summaries, indent=1) + "\n")
    if args.record:
        here = {name: summary for name, summary in summaries.items() if (RESULTS / name).is_dir()}
        RECORD.write_text(json.dumps(here, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
