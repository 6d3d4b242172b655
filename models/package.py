"""Model packages: a folder holding ``model.onnx`` and ``manifest.json``.

The manifest says what the model is (name, version, task), how to feed it (input spec and
preprocessing), how to read it (output spec and postprocessing), what it scored on its eval set
and bench, and the sha256 of every file. :func:`load_package` refuses a package whose manifest
does not validate or whose files are missing or do not match their checksums. No torch here:
edge and central import this module.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class PackageError(Exception):
    """A package that cannot be used: missing file, checksum mismatch, bad manifest."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorSpec(_Strict):
    name: str = Field(description="tensor name in the ONNX graph")
    shape: list[int | str] = Field(description="dimensions; a string names a dynamic axis, e.g. 'batch'")
    dtype: Literal["float32", "float16", "int8", "uint8"] = Field("float32", description="element type")


class SegmentationPreprocess(_Strict):
    kind: Literal["segmentation"] = "segmentation"
    height: int = Field(gt=0, description="model input height in pixels")
    width: int = Field(gt=0, description="model input width in pixels")
    grayscale: bool = Field(True, description="convert BGR frames to one gray channel")
    scale: float = Field(1 / 255, description="multiply pixel values by this first")
    mean: float = Field(0.0, description="then subtract this")
    std: float = Field(1.0, gt=0, description="then divide by this")


class AnomalyPreprocess(_Strict):
    kind: Literal["anomaly"] = "anomaly"
    channels: list[str] = Field(min_length=1, description="input channel names, in tensor order")
    mean: list[float] = Field(description="per-channel mean used to normalise inputs")
    std: list[float] = Field(description="per-channel std used to normalise inputs")
    hidden_size: int = Field(gt=0, description="LSTM hidden size (state width)")
    num_layers: int = Field(1, gt=0, description="LSTM layers (state depth)")


class SegmentationPostprocess(_Strict):
    kind: Literal["segmentation"] = "segmentation"
    classes: list[str] = Field(default_factory=lambda: ["background", "defect"], description="class names")
    threshold: float = Field(0.5, gt=0, lt=1, description="probability above which a pixel is a defect")
    min_area: int = Field(0, ge=0, description="smallest defect region in frame pixels")


class AnomalyPostprocess(_Strict):
    kind: Literal["anomaly"] = "anomaly"
    residual_scale: list[float] = Field(description="per-channel std of the normalised forecast error")
    threshold: float = Field(gt=0, description="score above which a sample is anomalous")
    ema_alpha: float = Field(1.0, gt=0, le=1, description="score smoothing: s = a*raw + (1-a)*s_prev; 1 = none")
    warmup_steps: int = Field(0, ge=0, description="samples after a (re)start that never alarm")


Preprocess = Annotated[Union[SegmentationPreprocess, AnomalyPreprocess], Field(discriminator="kind")]
Postprocess = Annotated[Union[SegmentationPostprocess, AnomalyPostprocess], Field(discriminator="kind")]


class Manifest(_Strict):
    name: str = Field(pattern=NAME_PATTERN, description="model name")
    version: str = Field(min_length=1, max_length=64, description="model version")
    task: Literal["segmentation", "anomaly"] = Field(description="what the model does")
    created: datetime = Field(default_factory=lambda: datetime.now(timezone.utc), description="build time")
    inputs: list[TensorSpec] = Field(min_length=1, description="graph inputs")
    outputs: list[TensorSpec] = Field(min_length=1, description="graph outputs")
    preprocess: Preprocess
    postprocess: Postprocess
    precision: Literal["fp32", "fp16", "int8"] = Field("fp32", description="weights precision")
    files: dict[str, str] = Field(default_factory=dict, description="sha256 of every file but the manifest")
    metrics: dict[str, float] = Field(default_factory=dict, description="quality on the eval set")
    bench: dict[str, float] = Field(default_factory=dict, description="latency on the bench machine")
    signature: str | None = Field(None, description="Ed25519 signature over the canonical manifest (not yet)")

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        if self.preprocess.kind != self.task or self.postprocess.kind != self.task:
            raise ValueError(f"preprocess/postprocess kinds must match task {self.task!r}")
        if isinstance(self.preprocess, AnomalyPreprocess):
            n = len(self.preprocess.channels)
            lengths = (len(self.preprocess.mean), len(self.preprocess.std), len(self.postprocess.residual_scale))
            if any(length != n for length in lengths):
                raise ValueError(f"mean, std and residual_scale need one value per channel ({n})")
        return self


@dataclass(frozen=True)
class Package:
    folder: Path
    manifest: Manifest
    model_path: Path

    @property
    def ref(self) -> str:
        return f"{self.manifest.name}:{self.manifest.version}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_package(folder: str | Path, manifest: Manifest, onnx_bytes: bytes) -> Package:
    """Write ``model.onnx`` and a manifest carrying its sha256; returns the loaded package."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_FILE).write_bytes(onnx_bytes)
    files = {MODEL_FILE: hashlib.sha256(onnx_bytes).hexdigest()}
    manifest = manifest.model_copy(update={"files": files})
    text = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
    (folder / MANIFEST_FILE).write_text(text)
    return load_package(folder)


def load_package(folder: str | Path) -> Package:
    """Read and verify a package; raises :class:`PackageError` saying what is wrong."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    if MODEL_FILE not in manifest.files:
        raise PackageError(f"{folder}: manifest lists no checksum for {MODEL_FILE}")
    for name, expected in manifest.files.items():
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise PackageError(f"{folder}: manifest names a file outside the package: {name!r}")
        if not path.is_file():
            raise PackageError(f"{folder}: missing file {name}")
        actual = sha256_file(path)
        if actual != expected:
            raise PackageError(f"{folder}: checksum mismatch for {name} (manifest {expected[:12]}…, file {actual[:12]}…)")
    return Package(folder=folder, manifest=manifest, model_path=folder / MODEL_FILE)


def _read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise PackageError(f"{folder}: missing file {MANIFEST_FILE}")
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'manifest'}: {e['msg']}" for e in exc.errors(include_url=False)[:5]
        )
        raise PackageError(f"{path}: bad manifest: {problems}") from None
