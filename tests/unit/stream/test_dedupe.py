import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream.dedupe import Deduper


def test_first_sighting_is_new_and_repeat_is_duplicate() -> None:
    d = Deduper(ttl_s=10, max_entries=100)
    assert d.seen("a", 0.0) is False
    assert d.seen("a", 1.0) is True
    assert d.seen("b", 1.0) is False


def test_entry_expires_after_ttl_of_event_time() -> None:
    d = Deduper(ttl_s=10, max_entries=100)
    d.seen("a", 0.0)
    d.seen("other", 10.0)
    assert d.seen("a", 10.0) is True  # exactly ttl: still remembered
    d2 = Deduper(ttl_s=10, max_entries=100)
    d2.seen("a", 0.0)
    d2.seen("other", 10.5)
    assert d2.seen("a", 10.5) is False  # forgotten: reported as new again
    assert d2.seen("a", 10.6) is True


def test_expired_entries_are_evicted_from_memory() -> None:
    d = Deduper(ttl_s=5, max_entries=1000)
    for i in range(100):
        d.seen(f"m{i}", float(i))
    assert len(d) == 6  # ids seen within the last 5 s of event time: 94..99


def test_clock_does_not_go_back_with_older_event_times() -> None:
    d = Deduper(ttl_s=10, max_entries=100)
    d.seen("a", 0.0)
    d.seen("b", 100.0)  # clock now 100: "a" expired
    assert d.seen("c", 5.0) is False  # an old machine clock does not revive "a"
    assert d.seen("a", 5.0) is False


def test_repeat_refreshes_entry() -> None:
    d = Deduper(ttl_s=10, max_entries=100)
    d.seen("a", 0.0)
    assert d.seen("a", 8.0) is True
    d.seen("x", 15.0)
    assert d.seen("a", 15.0) is True  # refreshed at 8, so not expired at 15


def test_max_entries_evicts_least_recently_seen() -> None:
    d = Deduper(ttl_s=1e9, max_entries=3)
    for msg_id in ("a", "b", "c"):
        d.seen(msg_id, 0.0)
    assert d.seen("a", 0.0) is True  # "a" is now the most recently seen
    d.seen("d", 0.0)  # evicts "b"
    assert len(d) == 3
    assert d.seen("a", 0.0) is True
    assert d.seen("c", 0.0) is True
    assert d.seen("b", 0.0) is False


@pytest.mark.parametrize(("ttl_s", "max_entries"), [(0.0, 10), (-1.0, 10), (10.0, 0)])
def test_rejects_bad_settings(ttl_s: float, max_entries: int) -> None:
    with pytest.raises(ValueError):
        Deduper(ttl_s=ttl_s, max_entries=max_entries)


@given(st.lists(st.tuples(st.integers(0, 50), st.floats(0, 1000)), max_size=300), st.integers(1, 20))
def test_memory_never_exceeds_max_entries(events: list[tuple[int, float]], max_entries: int) -> None:
    d = Deduper(ttl_s=30, max_entries=max_entries)
    for n, ts in events:
        d.seen(str(n), ts)
        assert len(d) <= max_entries


@given(st.lists(st.integers(0, 30), max_size=200))
def test_without_expiry_or_cap_reports_exactly_the_repeats(ids: list[int]) -> None:
    d = Deduper(ttl_s=1e9, max_entries=1000)
    seen: set[int] = set()
    for n in ids:
        assert d.seen(str(n), 0.0) is (n in seen)
        seen.add(n)


def test_each_source_has_its_own_clock() -> None:
    d = Deduper(ttl_s=10, max_entries=100)
    assert d.seen("a", 0.0, "m04") is False
    d.seen("far-future", 1e9, "m09")  # m09's clock only
    assert d.seen("a", 1.0, "m04") is True


def test_a_flooding_source_evicts_its_own_ids_first() -> None:
    d = Deduper(ttl_s=1e9, max_entries=10)
    d.seen("quiet-1", 0.0, "m01")
    for n in range(50):
        d.seen(f"flood-{n}", float(n), "m02")
    assert len(d) == 10 and d.evicted == 41
    assert d.seen("quiet-1", 1.0, "m01") is True


def test_expired_ids_of_a_source_are_dropped_with_it() -> None:
    d = Deduper(ttl_s=5, max_entries=100)
    for i in range(100):
        d.seen(f"m{i}", float(i), "m01")
        d.seen(f"n{i}", float(i), "m02")
    assert len(d) == 12 and d.evicted == 0
