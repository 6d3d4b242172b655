"""Evidence at the edge: which frames are kept, what is drawn, and the bounded local store."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.evidence import EvidenceRate, EvidenceStore, Candidate, evidence_token, render
from edge.settings import EvidenceConfig
from stream.messages import Evidence, EvidenceUpload
from stream.settings import ConfigError


def test_an_alarm_run_keeps_its_first_frame_then_one_per_interval() -> None:
    rate = EvidenceRate(min_interval_s=5.0, min_gap_s=1.0)
    kept = [t for t in np.arange(0.0, 12.0, 0.1) if rate.keep("c0", "seg", True, False, float(t))]
    assert np.allclose(kept, [0.0, 5.0, 10.0])


def test_a_new_run_is_kept_but_a_flickering_alarm_not_more_than_once_per_gap() -> None:
    rate = EvidenceRate(min_interval_s=5.0, min_gap_s=1.0)
    assert rate.keep("c0", "seg", True, False, 0.0) == "alarm"
    assert rate.keep("c0", "seg", False, False, 0.3) is None
    assert rate.keep("c0", "seg", True, False, 0.6) is None  # a new run, but within the gap
    assert rate.keep("c0", "seg", False, False, 1.2) is None
    assert rate.keep("c0", "seg", True, False, 1.5) == "alarm"  # a new run past the gap
    assert rate.keep("c0", "seg", True, False, 2.0) is None  # the same run, within the interval


def test_snapshots_are_always_kept_and_cameras_are_apart() -> None:
    rate = EvidenceRate(min_interval_s=5.0, min_gap_s=1.0)
    assert rate.keep("c0", "seg", True, False, 0.0) == "alarm"
    assert rate.keep("c0", "seg", False, True, 0.1) == "snapshot"
    assert rate.keep("c1", "seg", True, False, 0.1) == "alarm"  # another camera: its own spacing
    assert rate.keep("c0", "seg", False, False, 0.2) is None  # no alarm, no snapshot


def candidate(ts: float = 100.0, size: tuple[int, int] = (120, 160), gray: bool = False) -> Candidate:
    h, w = size
    image = np.full((h, w) if gray else (h, w, 3), 90, np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[40:80, 50:110] = 1
    evidence = Evidence(msg_id=f"evidence-{ts:g}", site="s1", machine="m1", ts=ts, camera="c0", seq=int(ts), model="seg", version="1",
                        reason="alarm", defect_ratio=float(mask.mean()), width=w, height=h)
    return Candidate(evidence, image, mask)


@pytest.mark.parametrize("gray", [False, True])
def test_the_overlay_draws_the_masks_contour_in_red_on_the_frame(gray: bool) -> None:
    upload = render(candidate(gray=gray), jpeg_quality=95)
    overlay = cv2.imdecode(np.frombuffer(upload.overlay_jpeg, np.uint8), cv2.IMREAD_COLOR)
    frame = cv2.imdecode(np.frombuffer(upload.frame_jpeg, np.uint8), cv2.IMREAD_COLOR)
    mask = cv2.imdecode(np.frombuffer(upload.mask_png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert overlay.shape == frame.shape == (120, 160, 3) and mask.shape == (120, 160)
    assert np.array_equal(mask, candidate().mask)  # lossless
    b, g, r = (int(v) for v in overlay[40, 80])  # on the contour's top edge
    assert r > 180 and r - g > 100 and r - b > 100
    assert np.abs(overlay[60, 80].astype(int) - 90).max() < 12  # inside the region: the frame as it was
    assert np.abs(overlay[10, 10].astype(int) - 90).max() < 12


def upload_of(ts: float) -> EvidenceUpload:
    return render(candidate(ts), jpeg_quality=85)


def test_the_store_keeps_records_oldest_first_and_reads_them_back(tmp_path: Path) -> None:
    store = EvidenceStore(tmp_path / "ev", max_bytes=10**8)
    later, earlier = store.add(upload_of(200.0)), store.add(upload_of(100.0))
    assert store.oldest_pending() == earlier
    assert store.read(earlier) == upload_of(100.0)
    store.move(earlier, "delivered")
    assert store.oldest_pending() == later
    assert (store.count("pending"), store.count("delivered")) == (1, 1)


def test_the_store_evicts_delivered_records_before_undelivered_ones_and_counts_them(tmp_path: Path) -> None:
    size = EvidenceStore(tmp_path / "probe", max_bytes=10**8)
    one = size.bytes if size.add(upload_of(1.0)) else 0
    store = EvidenceStore(tmp_path / "ev", max_bytes=3 * one + one // 2)  # room for three records
    names = [store.add(upload_of(float(t))) for t in (1, 2, 3)]
    store.move(names[1], "delivered")
    store.add(upload_of(4.0))
    assert store.evicted == {"delivered": 1}  # the delivered one went, although an older one waits
    assert store.oldest_pending() == names[0]
    store.add(upload_of(5.0))
    assert store.evicted == {"delivered": 1, "pending": 1}  # then the oldest undelivered
    assert store.oldest_pending() == names[2] and store.bytes <= store.max_bytes


def test_a_reopened_store_knows_its_records_and_drops_half_written_ones(tmp_path: Path) -> None:
    store = EvidenceStore(tmp_path / "ev", max_bytes=10**8)
    name = store.add(upload_of(1.0))
    (tmp_path / "ev" / "tmp" / "0000000002000-half").mkdir()  # what a killed agent left
    reopened = EvidenceStore(tmp_path / "ev", max_bytes=10**8)
    assert reopened.oldest_pending() == name and reopened.bytes == store.bytes > 0
    assert list((tmp_path / "ev" / "tmp").iterdir()) == []


def test_a_central_url_without_a_token_is_a_config_error_that_names_where_to_put_one(tmp_path: Path) -> None:
    config = EvidenceConfig(central_url="http://central:8080")
    with pytest.raises(ConfigError) as err:
        evidence_token(config, "m1", tmp_path, environ={})
    assert "evidence.central_url" in str(err.value) and "EDGELINE_EVIDENCE_TOKEN" in str(err.value)
    (tmp_path / "m1.token").write_text("secret-of-m1\n")
    with_file = config.model_copy(update={"token_file": "{machine}.token"})
    assert evidence_token(with_file, "m1", tmp_path, environ={}) == "secret-of-m1"
    assert evidence_token(config, "m1", tmp_path, environ={"EDGELINE_EVIDENCE_TOKEN": "from-env"}) == "from-env"
    with pytest.raises(ConfigError, match="evidence.token_file: cannot read"):
        evidence_token(with_file, "m2", tmp_path, environ={})
