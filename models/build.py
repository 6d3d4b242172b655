"""Build every builtin model package from real data, gate, sign, and replace what is in the repo.

    edgeline models build [--out models/packages] [--key ~/.config/edgeline/signing.key]

Runs the segmentation pipeline twice (seg-tiles on magnetic tiles, the default preset: the recipe
5-fold cross-validation chose, its figures read from ``models/seg_cv.json``; seg-synth on synthetic
conveyor cameras, the demo's model: train, export with parity, int8 and fp16 with the quality gate)
and the anomaly pipelines (anomaly-skab and anomaly-nab: streaming LSTM, settings by
leave-files-out cross-validation), then signs every package in the folder with the developer key
(generated on first use) and rewrites ``trusted.pub``. About 45 minutes on 2 CPU cores; needs the
``models`` extra and the data.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from models.package import Package

log = logging.getLogger(__name__)

DEFAULT_KEY = Path(os.environ.get("EDGELINE_SIGNING_KEY", "~/.config/edgeline/signing.key")).expanduser()


def build_all(out_dir: Path, key_path: Path = DEFAULT_KEY, progress: bool = True) -> list[Package]:
    from models.anomaly import build_nab_package, build_skab_package
    from models.segmentation import build_segmentation_packages, preset
    from models.package import sign_builtin_packages

    build_segmentation_packages(out_dir, preset("synthetic"), progress=progress)
    build_segmentation_packages(out_dir, progress=progress)
    build_skab_package(out_dir, progress=progress)
    build_nab_package(out_dir, progress=progress)
    return sign_builtin_packages(out_dir, key_path)
