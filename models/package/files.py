"""A model package on disk: a folder holding ``model.onnx`` and ``manifest.json``, or a tar of one.

:func:`load_package` refuses a package whose manifest does not validate, whose files are missing,
unlisted or do not match their checksums, and, when given trusted keys, whose signature is missing,
by an untrusted key or does not verify (:mod:`models.package.signing`). A package may also be a
``.tar``/``.tar.gz`` file, extracted safely into a cache within :class:`PackageSettings` limits
(archive size, unpacked size, file count); a refused tar leaves nothing in the cache. Writing a
package (:func:`write_package`, :func:`write_package_tar`) and signing one in place
(:func:`sign_package`, :func:`sign_builtin_packages`) are here too. No torch here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from models.package.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    Manifest,
    PackageError,
    PackageSettings,
    read_manifest,
    write_manifest,
)
from models.package.signing import (
    BUILTIN_PACKAGES,
    ensure_signing_key,
    key_id,
    sign_manifest,
    verify_signature,
    write_public_key,
)

log = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
CACHE_ENV = "EDGELINE_CACHE_DIR"


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

    A signature on ``manifest`` is dropped (the files changed); sign with :func:`sign_package`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_FILE).write_bytes(onnx_bytes)
    files = {MODEL_FILE: hashlib.sha256(onnx_bytes).hexdigest()}
    # Validated again from a full dump so that every field, defaults included, is set and written.
    complete = Manifest.model_validate(manifest.model_dump(mode="json") | {"files": files, "signature": None})
    write_manifest(folder, complete)
    return load_package(folder)


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
    them (:func:`models.package.signing.verify_signature`). A tar is extracted safely into ``cache_dir``
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
    signer = None
    if trusted_keys is not None:
        try:
            signer = verify_signature(manifest, trusted_keys)
        except PackageError as exc:
            raise type(exc)(f"{label}: {exc}") from None
    _verify_files(folder, manifest, label=label)
    return Package(folder=folder, manifest=manifest, model_path=folder / MODEL_FILE, key_id=signer)


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


# ------------------------------------------------------------------ signing a package folder


def sign_package(folder: str | Path, private_key: Ed25519PrivateKey) -> Package:
    """Sign a package folder in place: verify its checksums first, then write the signature.

    Nothing is recomputed: a package whose files do not match its manifest is refused
    (:class:`PackageError`), never silently re-hashed. A previous signature is replaced.
    """
    folder = Path(folder)
    package = load_package(folder)  # checksums, unlisted files, paths
    write_manifest(folder, sign_manifest(package.manifest, private_key))
    signed = load_package(folder, trusted_keys=[private_key.public_key()])
    log.info("signed %s at %s with key %s", signed.ref, folder, signed.key_id)
    return signed


def sign_builtin_packages(
    packages_dir: str | Path = BUILTIN_PACKAGES, key_path: str | Path | None = None
) -> list[Package]:
    """Sign every package folder in ``packages_dir`` and write its ``trusted.pub``.

    The key is ``key_path`` (default :func:`models.package.signing.default_signing_key_path`),
    generated on first use (mode 0600). ``trusted.pub`` is rewritten with that key's public half, so
    packages signed by an earlier key must be re-signed, which this does for every folder holding a
    manifest.
    """
    packages_dir = Path(packages_dir)
    private_key, _ = ensure_signing_key(key_path)
    folders = sorted(p for p in packages_dir.iterdir() if p.is_dir() and (p / MANIFEST_FILE).is_file())
    signed = [sign_package(folder, private_key) for folder in folders]
    signed_by = key_id(private_key.public_key())
    write_public_key(packages_dir / "trusted.pub", private_key.public_key())
    log.info("signed %d builtin package(s) in %s with key %s", len(signed), packages_dir, signed_by)
    return signed


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
