"""Results grouped per camera over a short window, to keep message rates sane at 50 machines.

A site of 50 machines x 4 cameras x 15 fps sends 3,000 results a second when every frame is its
own message; a 1 s window makes that 200, each carrying up to 15 frames. The window opens at a
camera's first frame and the group is sealed when a frame arrives after it has closed, or when
:meth:`ResultGrouper.due` is polled after it closed, so a camera that stops never strands a
group. A window of 0 seals every frame alone. Frames that carry a mask are always sent alone:
masks rank lowest in the outbox and must not drag a group of plain results down with them.

Pure logic on :class:`FrameResult` values; the caller publishes what comes back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stream.messages import FrameResult

MAX_FRAMES = 1000
"""A Result holds at most this many frames (the schema's bound)."""


@dataclass
class _Open:
    opened_at: float
    frames: list[FrameResult] = field(default_factory=list)


class ResultGrouper:
    """Collects each camera's frame results until its window closes."""

    def __init__(self, window_s: float) -> None:
        if window_s < 0:
            raise ValueError(f"window must be >= 0 s, got {window_s}")
        self.window_s = window_s
        self._open: dict[str, _Open] = {}

    def add(self, camera: str, frame: FrameResult, now: float) -> list[list[FrameResult]]:
        """Add one frame; return the groups of this camera that are now sealed, oldest first."""
        sealed: list[list[FrameResult]] = []
        current = self._open.get(camera)
        if current is not None and (now - current.opened_at >= self.window_s or _has_mask(frame)
                                    or len(current.frames) >= MAX_FRAMES):
            sealed.append(self._open.pop(camera).frames)
            current = None
        if self.window_s == 0 or _has_mask(frame):
            sealed.append([frame])
            return sealed
        if current is None:
            current = self._open[camera] = _Open(opened_at=now)
        current.frames.append(frame)
        return sealed

    def due(self, now: float) -> dict[str, list[FrameResult]]:
        """Groups whose window has closed, by camera, removed from the grouper."""
        closed = [camera for camera, group in self._open.items() if now - group.opened_at >= self.window_s]
        return {camera: self._open.pop(camera).frames for camera in closed}

    def drain(self) -> dict[str, list[FrameResult]]:
        """Every open group, whatever its age (shutdown)."""
        groups = {camera: group.frames for camera, group in self._open.items()}
        self._open.clear()
        return groups

    def pending(self) -> int:
        """Frames held in open groups."""
        return sum(len(group.frames) for group in self._open.values())


def _has_mask(frame: FrameResult) -> bool:
    return any(output.mask is not None for output in frame.outputs)
