"""Bounded ``msg_id`` dedupe for at-least-once delivery, driven by event time (no clocks)."""

from __future__ import annotations

from collections import OrderedDict


class Deduper:
    """Remembers recently seen message ids and reports repeats.

    Time is passed in (the message's event time), never read from a clock, so replays decide the
    same way. The dedupe clock is the newest ``now`` seen: a message id is forgotten once it has
    not been seen for ``ttl_s`` seconds of that clock. At most ``max_entries`` ids are kept; beyond
    that the least recently seen id goes first.
    """

    def __init__(self, ttl_s: float = 600.0, max_entries: int = 200_000) -> None:
        if ttl_s <= 0 or max_entries < 1:
            raise ValueError("ttl_s must be > 0 and max_entries >= 1")
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._last_seen: OrderedDict[str, float] = OrderedDict()  # least recently seen first
        self._clock = float("-inf")

    def __len__(self) -> int:
        return len(self._last_seen)

    def seen(self, msg_id: str, now: float) -> bool:
        """Record ``msg_id`` at event time ``now``; True when it was already seen and not expired."""
        self._clock = max(self._clock, now)
        expires_before = self._clock - self._ttl_s
        previous = self._last_seen.pop(msg_id, None)
        self._last_seen[msg_id] = max(now, previous) if previous is not None else now
        self._evict(expires_before)
        return previous is not None and previous >= expires_before

    def _evict(self, expires_before: float) -> None:
        # Entries are in last-seen order; event times from many machines are only roughly ordered,
        # so an expired entry behind a fresher one waits until it reaches the front or the cap.
        while self._last_seen:
            oldest_id, oldest_ts = next(iter(self._last_seen.items()))
            if oldest_ts >= expires_before and len(self._last_seen) <= self._max_entries:
                return
            del self._last_seen[oldest_id]
