"""eval-seg's evaluation of a folder through real ONNX Runtime sessions, and its pictures: the
overlays' panel layout pixel by pixel, the PR plot, the choice of worst and best images."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.package.synthetic import make_dataset
from models import seg_eval, tiles
from models.package import load_package
from models.package.signing import BUILTIN_PACKAGES

needs_data = pytest.mark.skipif(
    not tiles.tiles_available(), reason=f"magnetic-tile data not under {tiles.tiles_dir()} (set EDGELINE_DATA)"
)
SYNTH = BUILTIN_PACKAGES / "seg-synth-int8"
TILES = BUILTIN_PACKAGES / "seg-tiles-int8"


def synthetic_folder(root: Path, frames: int = 12, sub: str = "") -> Path:
    """Fresh synthetic conveyor frames written in the tiles' layout: frames showing a defect under
    MT_Crack, clean ones under MT_Free (JPEG quality 95, masks as 0/255 PNG)."""
    images, masks = make_dataset(20_001, frames, defect_rate=0.5, stride=17)
    for i, (image, mask) in enumerate(zip(images, masks)):
        folder = root / f"MT_{'Crack' if mask.any() else 'Free'}" / sub
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"frame{i:03d}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
        cv2.imwrite(str(folder / f"frame{i:03d}.png"), (mask > 0).astype(np.uint8) * 255)
    return root


def tiny_tiles(root: Path, sub: str = "", per_class: int = 2, free: int = 4) -> Path:
    """A handful of the real tiles (symlinks) in the shared layout (``sub=""``) or the original one."""
    for cls in tiles.CLASSES:
        src = tiles.tiles_dir() / f"MT_{cls}"
        dst = root / f"MT_{cls}" / sub
        dst.mkdir(parents=True)
        for image in sorted(src.glob("*.jpg"))[: free if cls == tiles.FREE else per_class]:
            for path in (image, image.with_suffix(".png")):
                os.symlink(path, dst / path.name)
    return root


@pytest.fixture(scope="module")
def synth_eval(tmp_path_factory):
    folder = synthetic_folder(tmp_path_factory.mktemp("synth"))
    return seg_eval.evaluate_folder(load_package(SYNTH), folder, threads=1)


def test_folder_of_synthetic_frames_is_scored_with_the_packages_own_alarm(synth_eval):
    m = synth_eval.metrics
    counts = synth_eval.classes
    assert set(counts) == {"Crack", "Free"} and counts["Crack"] >= 3 and counts["Free"] >= 2
    for key in ("iou", "dice", "iou_defect_images", "dice_defect_images", "iou_crack", "image_recall",
                "image_precision", "false_alarm_rate", "ap_crack"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["iou_defect_images"] > 0.4 and m["image_recall"] >= 0.6  # seg-synth: IoU 0.67, recall 0.89 on its set
    post = load_package(SYNTH).manifest.postprocess
    assert (m["alarm_pixel_threshold"], m["area_threshold"], m["alarm_top_k"]) == (post.alarm_threshold,
                                                                                   post.alarm_area_ratio, 0.0)
    # the verdict is the edge's image_alarm on each frame's probability map, not a re-calibration
    from models.package.postprocess import image_alarm

    frames = [s.load()[0] for s in synth_eval.samples]
    probs = synth_eval.model.infer(frames)
    assert [s.package_alarm for s in synth_eval.scores] == [image_alarm(p, post, []) for p in probs]
    assert m["val_images"] == len(synth_eval.samples)


def test_both_layouts_give_the_same_figures(tmp_path, synth_eval):
    folder = synthetic_folder(tmp_path / "orig", sub="Imgs")
    other = seg_eval.evaluate_folder(load_package(SYNTH), folder, threads=1)
    assert other.metrics == synth_eval.metrics


def test_overlays_show_frame_truth_and_prediction_side_by_side(tmp_path, synth_eval):
    written = seg_eval.write_overlays(synth_eval, tmp_path / "ov", count=2)
    names = [p.name for p in written]
    assert [n.split("_")[0] for n in names[:4]] == ["worst", "worst", "best", "best"] and names[4] == "pr_curve.png"
    picks = seg_eval.pick_overlays(synth_eval, 2)
    ious = [synth_eval.scores[i].iou for _, i in picks]
    defect_ious = sorted(s.iou for s in synth_eval.scores if s.cls != "Free")
    assert ious[:2] == defect_ious[:2] and sorted(ious[2:]) == defect_ious[-2:] and len({i for _, i in picks}) == 4
    threshold = synth_eval.model.postprocess.threshold
    for (kind, i), path in zip(picks, written):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        sample = synth_eval.samples[i]
        assert path.name == f"{kind}_{path.name.split('_')[1]}_{sample.cls}_{sample.name}.png"
        picture = cv2.imread(str(path), cv2.IMREAD_COLOR)
        image, truth = sample.load()
        h, w = image.shape
        assert picture.shape[:2] == seg_eval.overlay_size(h, w)
        scale, ph, pw = seg_eval.overlay_geometry(h, w)
        assert scale >= 1 and ph >= seg_eval.MIN_PANEL[0] and pw >= seg_eval.MIN_PANEL[1]

        def panel(index):
            y, x = seg_eval.panel_origin(index, h, w)
            return picture[y : y + ph, x : x + pw]

        up = np.kron(image, np.ones((scale, scale), np.uint8))
        assert np.array_equal(panel(0), np.repeat(up[..., None], 3, axis=2))
        truth_up = np.kron(truth, np.ones((scale, scale), np.uint8))
        assert np.array_equal(panel(1)[..., 0], truth_up * 255) and np.array_equal(panel(1)[..., 2], truth_up * 255)
        pred = synth_eval.model.infer([image])[0] > threshold
        reddish = panel(2)[..., 2].astype(int) - panel(2)[..., 1].astype(int) > 40
        assert reddish.any() == pred.any()
        if pred.any():  # the red pixels lie on the prediction (its fill and its 1-pixel contour)
            pred_up = np.kron(pred.astype(np.uint8), np.ones((scale, scale), np.uint8)) > 0
            assert (reddish & ~cv2.dilate(pred_up.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)).sum() == 0
        assert not panel(0)[..., 2].astype(int).__sub__(panel(0)[..., 1]).any()  # the frame panel stays gray
    plot = cv2.imread(str(written[-1]), cv2.IMREAD_COLOR)
    assert plot.shape[:2] == (seg_eval.PLOT[0], seg_eval.PLOT[1] + seg_eval.LEGEND_WIDTH)


def test_pr_plot_marks_each_operating_point_in_its_class_colour():
    curves = {"Crack": tiles.PRCurve("Crack", [(0.9, 1.0, 0.5), (0.2, 0.5, 1.0)], 0.75, (1.0, 0.5), 2, 2),
              "Fray": tiles.PRCurve("Fray", [(0.8, 1.0, 1.0)], 1.0, (0.8, 0.25), 1, 2)}
    plot = seg_eval.draw_pr_curves(curves, "test")
    for n, curve in enumerate(curves.values()):
        r, g, b = seg_eval.CLASS_COLORS[n]
        x, y = seg_eval.plot_point(curve.operating_point[1], curve.operating_point[0])
        assert np.abs(plot[y, x].astype(int) - (b, g, r)).max() <= 2


def test_fewer_defect_images_than_asked_are_each_shown_once(synth_eval):
    defects = sum(s.cls != "Free" for s in synth_eval.scores)
    picks = seg_eval.pick_overlays(synth_eval, defects)
    assert len(picks) == defects == len({i for _, i in picks}) and all(kind == "worst" for kind, _ in picks)


@needs_data
@pytest.mark.parametrize("sub", ["", "Imgs"])
def test_real_tiles_in_either_layout_through_the_tiles_package(tmp_path, sub):
    folder = tiny_tiles(tmp_path / "tiles", sub)
    evaluation = seg_eval.evaluate_folder(load_package(TILES), folder, threads=1)
    assert evaluation.classes == {cls: 4 if cls == "Free" else 2 for cls in tiles.CLASSES}
    m = evaluation.metrics
    for cls in tiles.DEFECT_CLASSES:
        assert 0 <= m[f"iou_{cls.lower()}"] <= 1 and 0 <= m[f"ap_{cls.lower()}"] <= 1, cls
    assert 0.2 < m["iou_defect_images"] <= 1.0 and m["iou"] <= m["iou_defect_images"] + 1e-9
    rows = {r["class"]: r for r in evaluation.class_rows()}
    assert rows["Free"]["flagged"] == m["false_alarm_rate"] and rows["Free"]["iou"] is None


def test_evaluation_and_pictures_run_without_torch_or_matplotlib(tmp_path):
    import subprocess
    import sys

    folder = synthetic_folder(tmp_path / "frames", frames=4)
    code = (f"import sys; from pathlib import Path; from models import seg_eval; "
            f"from models.package import load_package; "
            f"e = seg_eval.evaluate_folder(load_package(Path({str(SYNTH)!r})), Path({str(folder)!r}), 1); "
            f"seg_eval.write_overlays(e, Path({str(tmp_path / 'ov')!r}), 1); "
            f"sys.exit(('torch' in sys.modules) + 2 * ('matplotlib' in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ov" / "pr_curve.png").is_file()
