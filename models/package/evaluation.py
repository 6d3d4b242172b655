"""Quality measures shared by training, the offline evaluations and the benches.

Event-level precision/recall of anomaly alarms against labelled episodes (:func:`event_metrics`),
running a :class:`~models.package.anomaly.StreamingAnomalyModel` over whole streams
(:func:`score_streams`), and the pixel and image-level quality of predicted defect masks
(:func:`segmentation_metrics`). numpy only: no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from models.package.anomaly import StreamingAnomalyModel, runs


def event_metrics(labels: np.ndarray, alarms: np.ndarray, tolerance: int = 10) -> dict[str, float]:
    """Event-level precision/recall/F1 of alarms against labelled anomaly episodes.

    An episode counts as detected when any alarm falls inside it or within ``tolerance`` samples
    after its end (a forecaster also reacts to the return to normal). A run of consecutive alarms
    is a false alarm when it touches no such window. Precision = true alarm runs / all alarm runs,
    recall = detected episodes / episodes. Point-wise precision/recall and the mean detection
    delay (samples from episode start to first alarm) are reported too.
    """
    labels, alarms = np.asarray(labels, bool), np.asarray(alarms, bool)
    episodes, alarm_runs = runs(labels), runs(alarms)
    window = np.zeros(len(labels), bool)
    for start, end in episodes:
        window[start : min(len(labels), end + tolerance)] = True
    detected, delays = 0, []
    for start, end in episodes:
        hit = np.flatnonzero(alarms[start : min(len(labels), end + tolerance)])
        if len(hit):
            detected += 1
            delays.append(float(hit[0]))
    true_runs = sum(bool(window[s:e].any()) for s, e in alarm_runs)
    precision = true_runs / len(alarm_runs) if alarm_runs else 1.0
    recall = detected / len(episodes) if episodes else 1.0
    tp = int((labels & alarms).sum())
    return {
        "event_precision": precision,
        "event_recall": recall,
        "event_f1": _f1(precision, recall),
        "point_precision": tp / int(alarms.sum()) if alarms.any() else 1.0,
        "point_recall": tp / int(labels.sum()) if labels.any() else 1.0,
        "episodes": float(len(episodes)),
        "false_alarm_runs": float(len(alarm_runs) - true_runs),
    } | ({"mean_delay": float(np.mean(delays))} if delays else {})


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def score_streams(model: StreamingAnomalyModel, streams: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Run equally long streams ([T, C] each) as parallel groups; returns (scores[G,T], alarms[G,T])."""
    length = len(streams[0])
    scores = np.zeros((len(streams), length), np.float32)
    alarms = np.zeros((len(streams), length), bool)
    names = [f"eval{i}" for i in range(len(streams))]
    for name in names:
        model.reset(name)
    for t in range(length):
        result = model.step({name: stream[t] for name, stream in zip(names, streams)})
        for g, name in enumerate(names):
            scores[g, t], alarms[g, t] = result[name].score, result[name].is_anomaly
    for name in names:
        model.reset(name)
    return scores, alarms


def segmentation_metrics(
    predicted: Sequence[np.ndarray], truth: Sequence[np.ndarray], min_area: int
) -> dict[str, float]:
    """Pixel and image-level quality of predicted defect masks against true ones.

    - ``iou``: pooled defect IoU, sum of intersections over sum of unions across all frames.
    - ``recall``: share of frames with a true defect of at least ``min_area`` pixels in which
      anything was predicted. Frames whose only defect is a sliver below ``min_area`` (a part
      just entering or leaving the view) count neither way.
    - ``false_alarm_rate``: share of defect-free frames in which anything was predicted.
    - ``precision``: share of flagged frames that hold any true defect pixel.
    """
    inter = union = 0
    hits = positives = alarms = negatives = flagged = flagged_true = 0
    for pred, true in zip(predicted, truth, strict=True):
        pred, true = pred > 0, true > 0
        inter += int(np.logical_and(pred, true).sum())
        union += int(np.logical_or(pred, true).sum())
        area, any_pred = int(true.sum()), bool(pred.any())
        flagged += any_pred
        flagged_true += any_pred and area > 0
        if area >= max(1, min_area):
            positives += 1
            hits += any_pred
        elif area == 0:
            negatives += 1
            alarms += any_pred
    return {
        "iou": inter / union if union else 1.0,
        "recall": hits / positives if positives else 1.0,
        "false_alarm_rate": alarms / negatives if negatives else 0.0,
        "precision": flagged_true / flagged if flagged else 1.0,
        "frames_defective": float(positives),
        "frames_clean": float(negatives),
    }
