"""Results grouped per camera per window, on scripted timelines."""

from __future__ import annotations

import numpy as np
import pytest

from edge.grouping import ResultGrouper
from stream.messages import EncodedMask, FrameResult, ModelOutput


def frame(seq: int, mask: bool = False) -> FrameResult:
    output = ModelOutput(model="seg", version="1", latency_ms=1.0, defect_ratio=0.0,
                         mask=EncodedMask.encode(np.zeros((4, 4), np.uint8)) if mask else None)
    return FrameResult(seq=seq, ts=100.0 + seq, outputs=[output])


def seqs(groups) -> list[list[int]]:
    return [[f.seq for f in group] for group in groups]


def test_frames_of_one_camera_are_sealed_when_the_window_closes():
    grouper = ResultGrouper(window_s=1.0)
    sealed = [grouper.add("a", frame(i), now=i * 0.25) for i in range(9)]  # t = 0 .. 2.0
    assert seqs(sum(sealed, [])) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert grouper.pending() == 1
    assert seqs(grouper.due(2.5).values()) == []  # frame 8 opened the window at 2.0
    assert seqs(grouper.due(3.0).values()) == [[8]]
    assert grouper.pending() == 0


def test_cameras_have_windows_of_their_own():
    grouper = ResultGrouper(window_s=1.0)
    grouper.add("a", frame(0), now=0.0)
    grouper.add("b", frame(0), now=0.6)
    assert set(grouper.due(1.0)) == {"a"}
    assert set(grouper.due(1.6)) == {"b"}


def test_a_zero_window_seals_every_frame_alone():
    grouper = ResultGrouper(window_s=0.0)
    assert seqs(grouper.add("a", frame(0), now=0.0)) == [[0]]
    assert seqs(grouper.add("a", frame(1), now=0.0)) == [[1]]
    assert grouper.pending() == 0


def test_a_masked_frame_goes_alone_after_the_open_group():
    grouper = ResultGrouper(window_s=10.0)
    grouper.add("a", frame(0), now=0.0)
    grouper.add("a", frame(1), now=0.1)
    assert seqs(grouper.add("a", frame(2, mask=True), now=0.2)) == [[0, 1], [2]]
    assert seqs(grouper.add("a", frame(3), now=0.3)) == []
    assert seqs(grouper.drain().values()) == [[3]]


def test_negative_window_is_refused():
    with pytest.raises(ValueError, match=">= 0"):
        ResultGrouper(-1.0)
