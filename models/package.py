"""Model packages: a folder holding ``model.onnx`` and ``manifest.json``.

The manifest says what the model is (name, version, task), how to feed it (input spec and
preprocessing), how to read it (output spec and postprocessing), what it scored on its eval set
and bench, the sha256 of every file, and an Ed25519 signature over the canonical manifest
(:mod:`models.signing`). :func:`load_package` refuses a package whose manifest does not validate,
whose files are missing, unlisted or do not match their checksums, and, when given trusted keys,
whose signature is missing, by an untrusted key or does not verify. A package may also be a
``.tar``/``.tar.gz`` file, extracted safely into a cache within :class:`PackageSettings` limits
(archive size, unpacked size, file count); a refused tar leaves nothing in the cache.
:func:`check_model_graph` loads ``model.onnx`` in ONNX Runtime and compares its inputs and outputs
with the manifest. No torch here: edge and central import this module.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
CACHE_ENV = "EDGELINE_CACHE_DIR"


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
        "of the smoothed calibration scores (edge.anomaly.budget_threshold); None = threshold_factor x "
        "threshold_quantile")
    profiles: dict[str, dict[str, float | None]] = Field(
        default_factory=dict, description="named sets of overrides of the scalar fields above, measured with this "
        "model for another use (e.g. 'fast-start': short calibration on a fast-drifting pump); chosen at load time; "
        "null unsets an optional field (max_false_alarms_per_day: back to the quantile x factor threshold)")


Preprocess = Annotated[Union[SegmentationPreprocess, AnomalyPreprocess], Field(discriminator="kind")]
Postprocess = Annotated[Union[SegmentationPostprocess, AnomalyPostprocess], Field(discriminator="kind")]


class Signature(_Strict):
    """An Ed25519 signature over the canonical manifest (:func:`models.signing.canonical_manifest_bytes`)."""

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


@dataclass(frozen=True)
class Package:
    """A verified package: its folder (for a tar, where it was extracted), manifest and model file."""

    folder: Path
    manifest: Manifest
    model_path: Path
    key_id: str | None = None
    """The trusted key whose signature verified; None when loaded without trusted keys."""

    @property
    def ref(self) -> str:
        return f"{self.manifest.name}:{self.manifest.version}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_package_tar(path: str | Path) -> bool:
    return Path(path).name.endswith(TAR_SUFFIXES)


def write_package(folder: str | Path, manifest: Manifest, onnx_bytes: bytes) -> Package:
    """Write ``model.onnx`` and a complete, unsigned manifest carrying its sha256; returns the loaded package.

    A signature on ``manifest`` is dropped (the files changed); sign with :func:`models.signing.sign_package`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_FILE).write_bytes(onnx_bytes)
    files = {MODEL_FILE: hashlib.sha256(onnx_bytes).hexdigest()}
    # Validated again from a full dump so that every field, defaults included, is set and written.
    complete = Manifest.model_validate(manifest.model_dump(mode="json") | {"files": files, "signature": None})
    write_manifest(folder, complete)
    return load_package(folder)


def manifest_json(manifest: Manifest) -> dict[str, Any]:
    """The JSON object of ``manifest.json``: the fields set on the manifest.

    A manifest read from a file has exactly the keys that file has, so re-writing it (e.g. to add a
    signature) neither adds nor drops keys, and a field the schema gains later (with a default)
    does not change what an existing signature covers. :func:`write_package` sets every field.
    """
    return manifest.model_dump(mode="json", exclude_unset=True)


def write_manifest(folder: str | Path, manifest: Manifest) -> None:
    """Write ``manifest.json`` (indented, sorted keys) atomically; see :func:`manifest_json`."""
    path = Path(folder) / MANIFEST_FILE
    tmp = path.with_name(f".{MANIFEST_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest_json(manifest), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def load_package(
    path: str | Path,
    *,
    trusted_keys: Sequence[Ed25519PublicKey] | None = None,
    cache_dir: str | Path | None = None,
    limits: PackageSettings | None = None,
) -> Package:
    """Read and verify a package folder or tar (``.tar``, ``.tar.gz``, ``.tgz``).

    Always: the manifest validates; every file it lists is a plain relative path inside the
    package, exists and matches its sha256; the package holds no file the manifest does not list.
    With ``trusted_keys`` (checked first): the manifest carries a valid Ed25519 signature by one of
    them (:func:`models.signing.verify_signature`). A tar is extracted safely into ``cache_dir``
    (default ``$EDGELINE_CACHE_DIR`` or ``~/.cache/edgeline``) under ``packages/<sha256 of the tar>``,
    within ``limits`` (default :class:`PackageSettings`), and removed from there if refused.
    Raises :class:`PackageError` naming the package and the file at fault.
    """
    path = Path(path)
    if path.is_dir():
        return _verified(path, label=path, trusted_keys=trusted_keys)
    if path.is_file() and is_package_tar(path):
        folder = extract_package_tar(path, cache_dir, limits)
        try:
            return _verified(folder, label=path, trusted_keys=trusted_keys)
        except PackageError:
            remove_extraction(path, cache_dir)
            raise
    if path.exists():
        raise PackageError(f"{path}: not a package (a folder, or a {'/'.join(TAR_SUFFIXES)} file)")
    raise PackageError(f"{path}: no such package folder or file")


def _verified(folder: Path, label: Path, trusted_keys: Sequence[Ed25519PublicKey] | None) -> Package:
    manifest = read_manifest(folder, label=label)
    key_id = None
    if trusted_keys is not None:
        from models.signing import verify_signature  # models.signing imports this module

        try:
            key_id = verify_signature(manifest, trusted_keys)
        except PackageError as exc:
            raise type(exc)(f"{label}: {exc}") from None
    _verify_files(folder, manifest, label=label)
    return Package(folder=folder, manifest=manifest, model_path=folder / MODEL_FILE, key_id=key_id)


def check_model_graph(package: Package) -> None:
    """Refuse (:class:`PackageError`) a ``model.onnx`` that ONNX Runtime cannot load, or whose graph
    inputs or outputs differ from the manifest's: names in order, element types, ranks and fixed sizes
    (a named, dynamic axis on either side matches any size)."""
    import onnxruntime as ort  # only where graphs are checked (central's upload), not in every manifest reader

    try:
        session = ort.InferenceSession(str(package.model_path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise PackageError(f"{package.ref}: {MODEL_FILE} does not load in ONNX Runtime: {exc}") from None
    problems = (_tensor_problems("input", package.manifest.inputs, session.get_inputs())
                + _tensor_problems("output", package.manifest.outputs, session.get_outputs()))
    if problems:
        raise PackageError(f"{package.ref}: {MODEL_FILE} does not match the manifest: {'; '.join(problems)}")


ONNX_ELEMENT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int8": "tensor(int8)",
                      "uint8": "tensor(uint8)"}


def _tensor_problems(kind: str, specs: list[TensorSpec], graph: list[Any]) -> list[str]:
    """What differs between the manifest's ``specs`` and the graph's tensors (ONNX Runtime NodeArgs)."""
    if [s.name for s in specs] != [t.name for t in graph]:
        return [f"{kind}s are {[t.name for t in graph]} in the graph, {[s.name for s in specs]} in the manifest"]
    problems = []
    for spec, tensor in zip(specs, graph):
        if ONNX_ELEMENT_TYPES[spec.dtype] != tensor.type:
            problems.append(f"{kind} {spec.name!r} is {tensor.type} in the graph, {spec.dtype} in the manifest")
        sizes_differ = any(isinstance(a, int) and isinstance(b, int) and a != b
                           for a, b in zip(spec.shape, tensor.shape))
        if len(spec.shape) != len(tensor.shape) or sizes_differ:
            problems.append(f"{kind} {spec.name!r} has shape {tensor.shape} in the graph, {spec.shape} in the manifest")
    return problems


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


def _verify_files(folder: Path, manifest: Manifest, label: str | Path) -> None:
    if MODEL_FILE not in manifest.files:
        raise PackageError(f"{label}: manifest lists no checksum for {MODEL_FILE}")
    root = folder.resolve()
    for name, expected in sorted(manifest.files.items()):
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts or "\\" in name:
            raise PackageError(f"{label}: manifest names a file outside the package: {name!r}")
        if not pure.parts or str(pure) != name or name == MANIFEST_FILE:
            raise PackageError(f"{label}: manifest lists {name!r}, which is not a plain relative file name")
        path = folder / name
        if not path.resolve().is_relative_to(root):
            raise PackageError(f"{label}: {name} points outside the package (symbolic link to {path.resolve()})")
        if not path.is_file():
            raise PackageError(f"{label}: missing file {name}")
        actual = sha256_file(path)
        if actual != expected:
            raise PackageError(f"{label}: checksum mismatch for {name} (manifest {expected[:12]}…, file {actual[:12]}…)")
    for dirpath, dirnames, filenames in os.walk(folder):
        linked_dirs = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for entry in sorted(filenames + linked_dirs):
            rel = Path(dirpath, entry).relative_to(folder).as_posix()
            if rel != MANIFEST_FILE and rel not in manifest.files:
                raise PackageError(
                    f"{label}: unlisted file {rel} (every file in a package must be listed in the manifest "
                    "with its sha256, or it would escape the checksums and signature)"
                )


# ------------------------------------------------------------------ tar packages


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/edgeline").expanduser()


def extraction_dir(tar_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where :func:`extract_package_tar` puts a tar's files: ``<cache>/packages/<sha256 of the tar>``."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return cache / "packages" / sha256_file(tar_path)


def remove_extraction(tar_path: str | Path, cache_dir: str | Path | None = None) -> None:
    """Delete what :func:`extract_package_tar` extracted from ``tar_path`` (nothing there: no-op)."""
    shutil.rmtree(extraction_dir(tar_path, cache_dir), ignore_errors=True)


def extract_package_tar(tar_path: str | Path, cache_dir: str | Path | None = None,
                        limits: PackageSettings | None = None) -> Path:
    """Extract a package tar safely (once per tar content) and return the package folder. No checks of
    the package itself: :func:`load_package` does those.

    Only regular files and folders with plain relative names are accepted; absolute names, ``..``,
    links, devices and duplicate names are refused, and so is a tar over ``limits`` (archive size,
    then entry count and unpacked size, each checked before the entry is written). The package
    files sit either at the top of the archive or in its single top-level folder.
    """
    tar_path = Path(tar_path)
    limits = limits or PackageSettings()
    size = tar_path.stat().st_size
    if size > limits.max_archive_bytes:
        raise PackageError(f"{tar_path}: archive of {size:,} bytes is over the limit of "
                           f"{limits.max_archive_mib:g} MiB (packages.max_archive_mib)")
    target = extraction_dir(tar_path, cache_dir)
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name[:12]}-", dir=target.parent))
        try:
            _extract_members(tar_path, tmp, limits)
            try:
                tmp.rename(target)
            except OSError:
                if not target.is_dir():  # not a concurrent extraction of the same tar: a real error
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if (target / MANIFEST_FILE).is_file():
        return target
    entries = list(target.iterdir())
    if len(entries) == 1 and (entries[0] / MANIFEST_FILE).is_file():
        return entries[0]
    shutil.rmtree(target, ignore_errors=True)
    raise PackageError(f"{tar_path}: no {MANIFEST_FILE} at the top of the archive or in its single top-level folder")


def _extract_members(tar_path: Path, dest: Path, limits: PackageSettings) -> None:
    seen: set[str] = set()
    unpacked = 0
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            for count, member in enumerate(tar, start=1):
                name = member.name
                pure = PurePosixPath(name)
                parts = [part for part in pure.parts if part != "."]
                if pure.is_absolute() or ".." in parts or "\\" in name:
                    raise PackageError(f"{tar_path}: archive member {name!r} escapes the package folder")
                if not (member.isfile() or member.isdir()):
                    kind = "symbolic link" if member.issym() else "hard link" if member.islnk() else "device or fifo"
                    raise PackageError(
                        f"{tar_path}: archive member {name!r} is a {kind}; packages hold only regular files and folders"
                    )
                if count > limits.max_files:
                    raise PackageError(f"{tar_path}: more than {limits.max_files} entries in the archive "
                                       "(packages.max_files)")
                unpacked += member.size
                if unpacked > limits.max_unpacked_bytes:
                    raise PackageError(f"{tar_path}: unpacks to more than {limits.max_unpacked_mib:g} MiB "
                                       f"(packages.max_unpacked_mib; refused at member {name!r} of "
                                       f"{member.size / 2**20:.1f} MiB)")
                if not parts:
                    continue
                rel = "/".join(parts)
                if rel in seen:
                    raise PackageError(f"{tar_path}: archive member {name!r} appears twice")
                seen.add(rel)
                out = dest.joinpath(*parts)
                if member.isdir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None  # a regular file always has data
                with source, open(out, "xb") as fh:
                    shutil.copyfileobj(source, fh)
    except tarfile.TarError as exc:
        raise PackageError(f"{tar_path}: not a readable tar archive ({exc})") from None
    except OSError as exc:
        raise PackageError(f"{tar_path}: cannot extract: {exc}") from None


def write_package_tar(folder: str | Path, tar_path: str | Path) -> Path:
    """Write a verified package folder as a tar (gzip when the name ends in ``.gz``/``.tgz``), files at the top."""
    folder, tar_path = Path(folder), Path(tar_path)
    if not is_package_tar(tar_path):
        raise PackageError(f"{tar_path}: a package tar name ends in {', '.join(TAR_SUFFIXES)}")
    package = load_package(folder)
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tar_path.with_name(f".{tar_path.name}.{os.getpid()}.tmp")
    try:
        with tarfile.open(tmp, "w" if tar_path.name.endswith(".tar") else "w:gz") as tar:
            for name in [MANIFEST_FILE, *sorted(package.manifest.files)]:
                tar.add(folder / name, arcname=name, recursive=False, filter=_plain_member)
        os.replace(tmp, tar_path)
    finally:
        tmp.unlink(missing_ok=True)
    return tar_path


def _plain_member(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o644
    return info
