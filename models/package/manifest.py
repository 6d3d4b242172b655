"""The model package format: ``manifest.json`` beside ``model.onnx``.

The manifest says what the model is (name, version, task), how to feed it (input spec and
preprocessing), how to read it (output spec and postprocessing), what it scored on its eval set
and bench, the sha256 of every file, and an Ed25519 signature over the canonical manifest
(:mod:`models.package.signing`). This module holds the schema, how a manifest is read and written,
and :class:`PackageSettings` (the limits a package tar is accepted within); loading and verifying a
package on disk is :mod:`models.package.files`. No torch here.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class PackageError(Exception):
    """A package that cannot be used: missing file, checksum mismatch, bad manifest, bad signature."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PackageSettings(_Strict):
    """How packages are accepted: extraction limits (central and the edge) and where the edge downloads them."""

    max_archive_mib: float = Field(512.0, gt=0, description="largest package tar, as stored (compressed)")
    max_unpacked_mib: float = Field(1024.0, gt=0, description="most bytes a package tar may unpack to, all files "
                                    "together; extraction stops before writing past it")
    max_files: int = Field(64, ge=2, description="most entries (files and folders) in a package tar")
    download_urls: list[Annotated[str, Field(pattern=r"^https?://[^/?#]+")]] = Field(
        default_factory=list, description="URL prefixes the edge may download packages from, e.g. "
        "'https://central.plant.local:8080/models/'; empty: any http:// or https:// URL (other schemes never)")

    @field_validator("download_urls")
    @classmethod
    def _numeric_ports(cls, prefixes: list[str]) -> list[str]:
        for prefix in prefixes:
            urlsplit(prefix).port  # noqa: B018 - raises ValueError naming a port that is not a number
        return prefixes

    @property
    def max_archive_bytes(self) -> int:
        return int(self.max_archive_mib * 2**20)

    @property
    def max_unpacked_bytes(self) -> int:
        return int(self.max_unpacked_mib * 2**20)


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
    resize: Literal["fixed", "native"] = Field(
        "fixed", description="fixed: every frame is resized to height x width; native: each frame runs at its own "
        "size with its aspect kept, padded to a multiple of ``pad_multiple`` (height x width is then the reference "
        "frame of the self-test and the benchmarks)")
    pad_multiple: int = Field(16, ge=1, description="native: the padded sides are multiples of this (the net's stride)")
    max_side: int | None = Field(None, gt=0, description="native: a frame with a longer side is first downscaled to "
                                 "it, aspect kept (None: never)")


MAX_CHANNELS = 64
"""Most channels an anomaly package (and a sensor group) has."""


class AnomalyPreprocess(_Strict):
    kind: Literal["anomaly"] = "anomaly"
    channels: list[str] = Field(min_length=1, description="input channel names, in tensor order")
    mean: list[float] = Field(description="per-channel mean used to normalise inputs")
    std: list[float] = Field(description="per-channel std used to normalise inputs")
    hidden_size: int = Field(gt=0, description="LSTM hidden size (state width)")
    num_layers: int = Field(1, gt=0, description="LSTM layers (state depth)")
    difference: bool = Field(False, description="the graph takes x_t - x_(t-1) (normalised; 0 at a group's first "
                             "step) and forecasts the next difference, so its forecast of x_(t+1) is x_t + y")


class SegmentationPostprocess(_Strict):
    kind: Literal["segmentation"] = "segmentation"
    classes: list[str] = Field(default_factory=lambda: ["background", "defect"], description="class names")
    threshold: float = Field(0.5, gt=0, lt=1, description="probability above which a pixel is a defect")
    min_area: int = Field(0, ge=0, description="smallest defect region in frame pixels")
    alarm_threshold: float | None = Field(
        None, gt=0, lt=1, description="image-level alarm: pixel probability counted towards the alarm area "
        "(None: ``threshold``)")
    alarm_area_ratio: float = Field(
        0.0, ge=0, le=1, description="image-level alarm when the share of the frame above ``alarm_threshold`` "
        "exceeds this (calibrated on defect-free training images)")
    alarm_top_k: int | None = Field(
        None, ge=1, description="image-level alarm score: the mean of the frame's k highest pixel probabilities; "
        "the alarm fires when it exceeds ``alarm_threshold`` (None: the area rule above)")


class AnomalyPostprocess(_Strict):
    kind: Literal["anomaly"] = "anomaly"
    residual_scale: list[float] = Field(description="per-channel std of the normalised forecast error")
    threshold: float = Field(gt=0, description="score above which a sample is anomalous")
    ema_alpha: float = Field(1.0, gt=0, le=1, description="score smoothing: s = a*raw + (1-a)*s_prev; 1 = none")
    warmup_steps: int = Field(0, ge=0, description="samples after a (re)start that never alarm (LSTM state warm-up)")
    calibration_steps: int = Field(
        0, ge=0, description="per-group online calibration: the first N samples of a group fit its normalisation, "
        "residual scales and threshold and never alarm; 0 = use this package's values as they are")
    normalise_fraction: float = Field(0.5, gt=0, lt=1, description="share of the calibration samples that fit the "
                                      "input mean/std; the LSTM runs on the rest, which fit residual scales and threshold")
    threshold_quantile: float = Field(0.99, gt=0, le=1, description="calibrated threshold = factor x this quantile "
                                      "of the smoothed calibration scores")
    threshold_factor: float = Field(1.0, gt=0, description="calibrated threshold = this x the calibration quantile")
    min_scale: float = Field(1e-3, gt=0, description="floor of a fitted std, relative to the channel's level (inputs) "
                             "or absolute in normalised units (residuals)")
    level_weight: float = Field(0.0, ge=0, description="weight of the level term: score = forecast_weight * "
                                "mean((residual/scale)^2) + level_weight * mean(((e - mean)/std)^2), e the level_alpha "
                                "EMA of the values, mean/std fitted on the calibration samples' e")
    level_alpha: float = Field(1.0, gt=0, le=1, description="EMA of the raw values before the level z (a mean-shift "
                               "detector): e = a*x + (1-a)*e_prev; the level mean/std are fitted on the EMA'd calibration "
                               "values; 1 = the raw values")
    forecast_weight: float = Field(1.0, ge=0, description="weight of the forecast term mean((residual/scale)^2)")
    drift_halflife: float = Field(0.0, ge=0, description="samples: outside alarm events and below the exit level, "
                                  "a group's level mean follows its EMA'd values with this half-life (slow normal "
                                  "drift); frozen during events; 0 = never")
    exit_ratio: float = Field(1.0, gt=0, le=1, description="hysteresis: an alarm event opens when the smoothed score "
                              "exceeds the threshold and closes after ``clear_steps`` samples at or below this x "
                              "the threshold")
    clear_steps: int = Field(1, ge=1, description="consecutive samples at or below the exit level that close an event")
    max_false_alarms_per_day: float | None = Field(
        None, gt=0, description="false-alarm budget per group: the threshold comes from a peaks-over-threshold fit "
        "of the smoothed calibration scores (models.package.anomaly.budget_threshold); None = threshold_factor x "
        "threshold_quantile")
    profiles: dict[str, dict[str, float | None]] = Field(
        default_factory=dict, description="named sets of overrides of the scalar fields above, measured with this "
        "model for another use (e.g. 'fast-start': short calibration on a fast-drifting pump); chosen at load time; "
        "null unsets an optional field (max_false_alarms_per_day: back to the quantile x factor threshold)")


Preprocess = Annotated[Union[SegmentationPreprocess, AnomalyPreprocess], Field(discriminator="kind")]
Postprocess = Annotated[Union[SegmentationPostprocess, AnomalyPostprocess], Field(discriminator="kind")]


class Signature(_Strict):
    """An Ed25519 signature over the canonical manifest (:func:`models.package.signing.canonical_manifest_bytes`)."""

    algorithm: Literal["ed25519"] = Field("ed25519", description="signature algorithm")
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$", description="first 16 hex of the sha256 of the raw public key")
    value: str = Field(description="the 64-byte signature, base64 (standard alphabet, padded)")

    @field_validator("value")
    @classmethod
    def _sixty_four_bytes(cls, value: str) -> str:
        try:
            raw = base64.b64decode(value, validate=True)
        except binascii.Error:
            raise ValueError("not valid base64") from None
        if len(raw) != 64:
            raise ValueError(f"an Ed25519 signature is 64 bytes, this one {len(raw)}")
        return value


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
    training: dict[str, Any] = Field(default_factory=dict, description="how the model was made: the recipe, the "
                                     "hash of the data it saw, its cross-validated figures")
    signature: Signature | None = Field(None, description="Ed25519 signature of the canonical manifest, or None")

    @property
    def package_id(self) -> str:
        """How central, rollouts and heartbeats name a package: ``<name>-<version>-<precision>``."""
        return f"{self.name}-{self.version}-{self.precision}"

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


def manifest_json(manifest: Manifest) -> dict[str, Any]:
    """The JSON object of ``manifest.json``: the fields set on the manifest.

    A manifest read from a file has exactly the keys that file has, so re-writing it (e.g. to add a
    signature) neither adds nor drops keys, and a field the schema gains later (with a default)
    does not change what an existing signature covers. :func:`models.package.files.write_package` sets every field.
    """
    return manifest.model_dump(mode="json", exclude_unset=True)


def write_manifest(folder: str | Path, manifest: Manifest) -> None:
    """Write ``manifest.json`` (indented, sorted keys) atomically; see :func:`manifest_json`."""
    path = Path(folder) / MANIFEST_FILE
    tmp = path.with_name(f".{MANIFEST_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest_json(manifest), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_manifest(folder: str | Path, label: str | Path | None = None) -> Manifest:
    """Parse and validate ``manifest.json`` (no checksums); errors name ``label`` (default: the folder)."""
    folder = Path(folder)
    label = folder if label is None else label
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise PackageError(f"{label}: missing file {MANIFEST_FILE}")
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'manifest'}: {e['msg']}" for e in exc.errors(include_url=False)[:5]
        )
        raise PackageError(f"{label}/{MANIFEST_FILE}: bad manifest: {problems}") from None
