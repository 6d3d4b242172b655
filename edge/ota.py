"""Model swaps on a running agent, without stopping inference.

A new package is verified (checksums and signature against the site's trusted keys), loaded in
its own ONNX Runtime session beside the running one and warmed up, then self-tested on the
cameras' most recent frames: every probability map must be finite, in [0, 1] and frame-sized,
and its agreement with the running model (mask IoU over the same frames) is measured, which is
what shadow mode reports. Only then is it put in place, by replacing one dict entry that the
inference thread reads once per batch, so no frame waits on the swap. The model it replaced is
kept, and ``rollback`` puts it back. :class:`ModelRecord` keeps each model's health since its
package was loaded (frames, failures, mean defect ratio): heartbeats carry it to the rollout
gates, and a package that fails ``LOCAL_ROLLBACK_BATCHES`` batches in a row is rolled back on
the machine itself.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import IO

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from models.package.session import ModelLoadError, SegmentationModel
from models.package import PackageError, PackageSettings, extraction_dir, load_package
from stream.messages import ModelHealth, ShadowStatus

log = logging.getLogger(__name__)


KEEP_DOWNLOADS = 3
"""Downloaded package tars kept on disk (the running one, the one before, and one more)."""


LOCAL_ROLLBACK_BATCHES = 3
"""Batches in a row a newly loaded package may fail before the agent puts the previous one back."""


class DownloadError(RuntimeError):
    pass


@dataclass
class ModelRecord:
    """One model's health since its package was loaded."""

    package: str
    frames: int = 0
    errors: int = 0
    ratio_sum: float = 0.0
    failing_batches: int = 0
    """Batches in a row that raised (0 after any success)."""

    def succeeded(self, ratios: Sequence[float]) -> None:
        self.frames += len(ratios)
        self.ratio_sum += sum(ratios)
        self.failing_batches = 0

    def failed(self, frames: int) -> None:
        self.errors += frames
        self.failing_batches += 1

    def health(self) -> ModelHealth:
        return ModelHealth(package=self.package, frames=self.frames, errors=self.errors,
                           defect_ratio_mean=min(1.0, self.ratio_sum / self.frames) if self.frames else 0.0)


DOWNLOAD_SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}


def check_download_url(url: str, allowed: Sequence[str] = ()) -> None:
    """Refuse (:class:`DownloadError`) a URL that is not http:// or https://, or, when ``allowed``
    prefixes are given (``packages.download_urls``), one that is under none of them: same scheme,
    host and port, and a path below the prefix's path (the query, e.g. a signed token, is free)."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError as exc:
        raise DownloadError(f"refused to download {url!r}: {exc}") from None
    if parts.scheme not in DOWNLOAD_SCHEMES or not parts.hostname:
        raise DownloadError(f"refused to download {url!r}: only http:// and https:// URLs with a host "
                            "are followed")
    if allowed and not any(_under(parts, urllib.parse.urlsplit(prefix)) for prefix in allowed):
        raise DownloadError(f"refused to download {url!r}: not under packages.download_urls ({', '.join(allowed)})")


def _under(url: urllib.parse.SplitResult, prefix: urllib.parse.SplitResult) -> bool:
    base = prefix.path if prefix.path.endswith("/") else prefix.path + "/"
    return (url.scheme == prefix.scheme and url.hostname == prefix.hostname
            and (url.port or DEFAULT_PORTS[url.scheme]) == (prefix.port or DEFAULT_PORTS[prefix.scheme])
            and (url.path + "/").startswith(base))


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL :func:`check_download_url` accepts."""

    def __init__(self, allowed: Sequence[str]) -> None:
        self.allowed = allowed

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: Message,
                         newurl: str) -> urllib.request.Request | None:
        try:
            check_download_url(newurl, self.allowed)
        except DownloadError as exc:
            raise DownloadError(f"{req.full_url} redirected to a URL it may not: {exc}") from None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_package(url: str, sha256: str, folder: Path, settings: PackageSettings, keep: int = KEEP_DOWNLOADS) -> Path:
    """Download a package tar from central into ``folder`` (verified against ``sha256``, which central
    sends with the rollout), keeping the ``keep`` newest downloads. Already there: not fetched again.
    A URL that :func:`check_download_url` refuses (``settings.download_urls``) is refused before
    anything is read or written; a download is stopped once it passes ``settings.max_archive_mib``."""
    check_download_url(url, settings.download_urls)
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise DownloadError(f"refused to download {url!r}: sha256 {sha256[:80]!r} is not 64 hex digits")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{sha256}.tar"
    if not target.exists():
        partial = target.with_suffix(".part")
        digest = hashlib.sha256()
        opener = urllib.request.build_opener(_CheckedRedirects(settings.download_urls))
        try:
            with opener.open(url, timeout=60) as response, partial.open("wb") as out:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                    if out.tell() > settings.max_archive_bytes:
                        raise DownloadError(f"download of {url} stopped: over {settings.max_archive_mib:g} MiB "
                                            "(packages.max_archive_mib)")
        except DownloadError:
            partial.unlink(missing_ok=True)
            raise
        except (urllib.error.URLError, OSError) as exc:
            partial.unlink(missing_ok=True)
            raise DownloadError(f"download of {url} failed: {exc}") from exc
        if digest.hexdigest() != sha256:
            partial.unlink(missing_ok=True)
            raise DownloadError(f"download of {url} has sha256 {digest.hexdigest()[:12]}…, expected {sha256[:12]}…")
        partial.rename(target)
    target.touch()
    for old in sorted(folder.glob("*.tar"), key=lambda p: p.stat().st_mtime, reverse=True)[keep:]:
        old.unlink(missing_ok=True)
    return target


@dataclass(frozen=True)
class SwapOutcome:
    ok: bool
    text: str
    details: dict[str, str | float] = field(default_factory=dict)


def mask_overlap(a: Sequence[np.ndarray], b: Sequence[np.ndarray], threshold: float) -> tuple[int, int]:
    """Intersection and union, in pixels, of two models' defect masks over the same frames."""
    inter = union = 0
    for pa, pb in zip(a, b, strict=True):
        ma, mb = pa > threshold, pb > threshold
        inter += int(np.logical_and(ma, mb).sum())
        union += int(np.logical_or(ma, mb).sum())
    return inter, union


def mask_agreement(a: Sequence[np.ndarray], b: Sequence[np.ndarray], threshold: float) -> float:
    """Pooled IoU of the defect masks of two models over the same frames (1.0 when both are empty)."""
    inter, union = mask_overlap(a, b, threshold)
    return inter / union if union else 1.0


def self_test(candidate: SegmentationModel, frames: Sequence[np.ndarray]) -> tuple[list[np.ndarray], str | None]:
    """The candidate's maps for ``frames``, and what is wrong with them (None: nothing).

    ``frames`` are the cameras' own recent frames, so a ``native`` candidate is tried at each
    resolution it will run at; a fixed one and a native one both answer at frame size, so their
    masks compare pixel for pixel (:func:`mask_agreement`)."""
    try:
        maps = candidate.infer(list(frames))
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's errors derive from Exception only
        return [], f"inference failed on {len(frames)} frames: {exc}"
    for frame, prob in zip(frames, maps):
        if prob.shape != frame.shape[:2]:
            return maps, f"output {prob.shape} does not match the frame {frame.shape[:2]}"
        if not np.isfinite(prob).all() or prob.min() < 0.0 or prob.max() > 1.0:
            return maps, "output is not a probability map (NaN, inf or outside [0, 1])"
    return maps, None


@dataclass
class ShadowRun:
    """A candidate beside the current model: every ``every``-th batch of the model's frames also
    goes through the candidate, and the two are compared (mask IoU, inference time)."""

    model: SegmentationModel
    every: int = 5
    batches: int = 0
    frames: int = 0
    inter: int = 0
    union: int = 0
    candidate_s: float = 0.0
    current_s: float = 0.0

    def maybe_compare(self, images: Sequence[np.ndarray], current: Sequence[np.ndarray], current_s: float,
                      threshold: float) -> None:
        self.batches += 1
        if self.batches % self.every:
            return
        started = time.perf_counter()
        candidate = self.model.infer(list(images))
        self.candidate_s += time.perf_counter() - started
        self.current_s += current_s
        inter, union = mask_overlap(candidate, current, threshold)
        self.inter, self.union = self.inter + inter, self.union + union
        self.frames += len(images)

    def status(self) -> ShadowStatus:
        return ShadowStatus(package=self.model.package_id, frames=self.frames,
                            agreement=self.inter / self.union if self.union else 1.0,
                            latency_ratio=self.candidate_s / self.current_s if self.current_s else 0.0)


class ModelSwapper:
    """Swaps the segmentation models of one agent (``models`` is the agent's own dict).

    A package it refuses is removed from the package cache, and from ``downloads`` when it was
    downloaded there, so refused packages never pile up on the machine."""

    def __init__(self, models: dict[str, SegmentationModel], trusted_keys: list[Ed25519PublicKey] | None,
                 providers: dict[str, Sequence[str]], threads: dict[str, int], downloads: Path,
                 limits: PackageSettings | None = None) -> None:
        self.models = models
        self.trusted_keys = trusted_keys
        self.providers = providers
        self.threads = threads
        self.downloads = downloads
        self.limits = limits or PackageSettings()
        self.previous: dict[str, SegmentationModel] = {}
        self._lock = threading.Lock()  # one swap at a time

    def load(self, name: str, path: Path, recent_frames: Sequence[np.ndarray]) -> SwapOutcome:
        with self._lock:
            outcome = self._load(name, path, recent_frames)
            if not outcome.ok:
                self.discard(path)
        if outcome.ok:
            log.info("model %s", outcome.text)
        return outcome

    def _load(self, name: str, path: Path, recent_frames: Sequence[np.ndarray]) -> SwapOutcome:
        try:
            candidate = self._open(name, path)
        except (PackageError, ModelLoadError, OSError) as exc:
            return SwapOutcome(False, f"{name}: refused: {exc}")
        current = self.models[name]
        details: dict[str, str | float] = {"model": name, "version": candidate.version,
                                           "precision": candidate.package.manifest.precision}
        if recent_frames:
            maps, problem = self_test(candidate, recent_frames)
            if problem:
                return SwapOutcome(False, f"{name}: self-test failed: {problem}", details)
            details["agreement"] = round(mask_agreement(maps, current.infer(list(recent_frames)),
                                                        current.postprocess.threshold), 4)
            details["self_test_frames"] = float(len(recent_frames))
        self.previous[name] = current
        self.models[name] = candidate  # the swap: the inference thread picks it up at its next batch
        return SwapOutcome(True, f"{name}: now {candidate.package_id} in place of {current.package_id}", details)

    def _open(self, name: str, path: Path) -> SegmentationModel:
        if name not in self.models:
            raise ModelLoadError(f"no model {name!r} on this machine")
        package = load_package(path, trusted_keys=self.trusted_keys, limits=self.limits)
        return SegmentationModel(package, self.providers.get(name, ("cpu",)), self.threads.get(name, 1))

    def candidate(self, name: str, path: Path) -> SegmentationModel:
        """A verified, warmed-up model for ``name`` that is not put in place (shadow mode)."""
        try:
            return self._open(name, path)
        except (PackageError, ModelLoadError, OSError):
            self.discard(path)
            raise

    def discard(self, path: Path) -> None:
        """Remove a refused package tar's extraction from the cache and, if it was downloaded, the tar
        itself (a folder given on this box stays, and so does a package a model still runs from)."""
        if not path.is_file():
            return
        extracted = extraction_dir(path)
        in_use = [model.package.folder for model in [*self.models.values(), *self.previous.values()]]
        if any(folder.is_relative_to(extracted) for folder in in_use):
            return
        shutil.rmtree(extracted, ignore_errors=True)
        if path.parent.resolve() == self.downloads.resolve():
            path.unlink(missing_ok=True)
        log.info("removed refused package %s from the cache", path)

    def adopt(self, name: str, candidate: SegmentationModel) -> SwapOutcome:
        """Put a shadow candidate in place (the current one is kept for ``rollback``)."""
        with self._lock:
            self.previous[name], self.models[name] = self.models[name], candidate
        manifest = candidate.package.manifest
        return SwapOutcome(True, f"{name}: promoted {manifest.package_id}",
                           {"model": name, "version": manifest.version, "precision": manifest.precision})

    def rollback(self, name: str) -> SwapOutcome:
        with self._lock:
            previous = self.previous.pop(name, None)
            if previous is None:
                return SwapOutcome(False, f"{name}: nothing to roll back to")
            self.models[name] = previous
        return SwapOutcome(True, f"{name}: back on {previous.package_id}",
                           {"model": name, "version": previous.version,
                            "precision": previous.package.manifest.precision})
