"""Overload policy of the inference loop: when inference cannot keep up, shed the lowest-priority
cameras first, and give them back when it can. Pure logic, driven by the loop's own timings.

The loop reports, once per cycle, how long it was busy. Over a window (``window_s``) that gives
its duty: busy time / wall time. A window above ``high`` sheds one more camera (the lowest
priority still served; ties: the last in config order); a window below ``low`` restores the most
recently shed one. A shed camera is inferred on one frame in ``stride`` only, so its results
slow down rather than stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ShedChange:
    """What one window decided: a camera newly shed or restored (else both None)."""

    shed: str | None = None
    restored: str | None = None
    duty: float = 0.0


@dataclass
class LoadShedder:
    priorities: dict[str, int]
    """camera id -> priority (higher is more important), in config order."""
    high: float = 0.9
    low: float = 0.6
    window_s: float = 2.0
    stride: int = 3
    shed: list[str] = field(default_factory=list)
    _window_start: float | None = None
    _busy: float = 0.0
    _cycles: dict[str, int] = field(default_factory=dict)

    def should_infer(self, camera: str) -> bool:
        """False for the frames a shed camera skips (one in ``stride`` goes through)."""
        if camera not in self.shed:
            return True
        count = self._cycles.get(camera, 0)
        self._cycles[camera] = count + 1
        return count % self.stride == 0

    def report(self, now: float, busy_s: float) -> ShedChange:
        """One inference cycle ended at ``now`` after ``busy_s`` of work."""
        if self._window_start is None:
            self._window_start = now - busy_s
        self._busy += busy_s
        elapsed = now - self._window_start
        if elapsed < self.window_s:
            return ShedChange()
        duty = self._busy / elapsed
        self._window_start, self._busy = now, 0.0
        if duty > self.high:
            served = [c for c in self.priorities if c not in self.shed]
            if len(served) > 1:  # never shed the last camera
                victim = min(reversed(served), key=lambda c: self.priorities[c])
                self.shed.append(victim)
                return ShedChange(shed=victim, duty=duty)
        elif duty < self.low and self.shed:
            back = self.shed.pop()
            self._cycles.pop(back, None)
            return ShedChange(restored=back, duty=duty)
        return ShedChange(duty=duty)
