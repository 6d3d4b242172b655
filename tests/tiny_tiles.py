"""A data root of a few real magnetic tiles (symlinks into the shared data, same layout), for tests
that train, quantize or cross-validate on real images in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from models import tiles


def tiny_tiles_root(base: Path, per_class: int = 3, free: int = 6) -> Path:
    """``base/data``, holding the first ``per_class`` tiles of each defect class and ``free``
    defect-free ones; skips the calling test when the shared tiles are absent."""
    if not tiles.tiles_available():
        pytest.skip(f"magnetic-tile data not under {tiles.tiles_dir()} (set EDGELINE_DATA)")
    root = base / "data"
    for cls in tiles.CLASSES:
        src, dst = tiles.tiles_dir() / f"MT_{cls}", root / "magnetic-tile" / f"MT_{cls}"
        dst.mkdir(parents=True)
        for image in sorted(src.glob("*.jpg"))[: free if cls == tiles.FREE else per_class]:
            for path in (image, image.with_suffix(".png")):
                (dst / path.name).symlink_to(path)
    return root
