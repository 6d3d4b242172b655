"""The SQLite outbox: order, acks, the size bound (lowest priority first, counted) and durability."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from edge.outbox import Outbox, Priority


def test_pending_is_oldest_first_and_ack_deletes(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    ids = [box.put(f"t/{i}", f"m{i}".encode(), Priority.RESULT) for i in range(5)]
    assert [p.payload for p in box.pending()] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert [p.row_id for p in box.pending(after=ids[2])] == ids[3:]
    box.ack(ids[1])
    box.ack(ids[1])  # a duplicate PUBACK changes nothing
    assert box.depth == 4 and box.acked == 1
    assert [p.topic for p in box.pending(limit=2)] == ["t/0", "t/2"]


def test_full_outbox_drops_the_oldest_of_the_lowest_priority_first(tmp_path):
    box = Outbox(tmp_path / "o.sqlite", max_messages=4)
    box.put("a", b"alert", Priority.ALERT)
    box.put("m", b"mask-1", Priority.MASK)
    box.put("r", b"result-1", Priority.RESULT)
    box.put("m", b"mask-2", Priority.MASK)
    box.put("r", b"result-2", Priority.RESULT)  # full: mask-1 goes
    box.put("r", b"result-3", Priority.RESULT)  # mask-2 goes
    box.put("n", b"anomaly", Priority.ANOMALY)  # no masks left: result-1 goes
    assert [p.payload for p in box.pending()] == [b"alert", b"result-2", b"result-3", b"anomaly"]
    assert box.dropped == {Priority.MASK: 2, Priority.RESULT: 1} and box.dropped_total == 3
    assert box.put("m", b"mask-3", Priority.MASK) is None  # outranked by everything stored: refused
    assert box.dropped[Priority.MASK] == 3 and box.depth == 4


def test_rows_survive_a_killed_process(tmp_path):
    path = tmp_path / "o.sqlite"
    writer = textwrap.dedent(f"""
        import os, signal
        from edge.outbox import Outbox, Priority
        box = Outbox({str(path)!r})
        for i in range(50):
            box.put("t", str(i).encode(), Priority.RESULT)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", writer], check=False)
    assert proc.returncode == -9
    box = Outbox(path)
    assert box.depth == 50
    assert [p.payload for p in box.pending(limit=1000)] == [str(i).encode() for i in range(50)]


def test_bad_bound_is_refused(tmp_path):
    with pytest.raises(ValueError, match="max_messages must be >= 1"):
        Outbox(tmp_path / "o.sqlite", max_messages=0)
