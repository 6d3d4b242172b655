"""Ed25519 signatures over model package manifests, the keys that make them, and which keys a site
trusts (:class:`SignatureConfig`, :func:`trusted_keys`). No torch here: edge and central import it.

What is signed
    The manifest, in the canonical form of :func:`canonical_manifest_bytes`. The manifest lists the
    sha256 of every file in the package (``files``; ``manifest.json`` itself excluded), so the
    signature covers the files through their checksums. :func:`models.package.files.load_package`
    checks both: the signature (when given trusted keys) and then every checksum; signing a package
    folder is :func:`models.package.files.sign_package`.

Canonical manifest bytes (what another implementation must reproduce)
    1. Take the JSON object of ``manifest.json`` as this project writes it
       (:func:`models.package.manifest.manifest_json`): exactly the keys present in the file (a
       package built by :func:`models.package.files.write_package` has every field; a field the
       schema gains later, with a default, is absent from older files and so not part of their
       signatures, which stay valid), ``created`` as ISO 8601 UTC with a ``Z`` suffix, float
       fields as Python's shortest round-trip ``repr`` (``0.5``, ``2.0``, ``1e-07``: a float always
       has a fraction or an exponent), integer fields as integers.
    2. Remove the top-level ``signature`` key.
    3. Serialise with object keys sorted by code point at every level, no insignificant whitespace
       (separators ``,`` and ``:``), non-ASCII characters written as themselves (no ``\\u`` escapes),
       and encode as UTF-8. NaN and infinities are refused (they have no JSON form).
    In Python: ``json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
    allow_nan=False).encode("utf-8")``.

Signature JSON shape (the manifest's ``signature`` field)
    ``{"algorithm": "ed25519", "key_id": "<16 hex>", "value": "<base64 of the 64-byte signature>"}``
    ``key_id`` is the first 16 hex characters of the sha256 of the 32-byte raw public key.

Keys are PEM files: private keys PKCS#8 (unencrypted, mode 0600), public keys SubjectPublicKeyInfo.
A public key file may hold several PEM blocks (key rotation); all of them are trusted.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import Field

from models.package.manifest import Manifest, PackageError, Signature, manifest_json
from stream.settings import Strict

log = logging.getLogger(__name__)

BUILTIN_PACKAGES = Path(__file__).resolve().parent.parent / "packages"
"""The packages shipped inside the ``models`` package (``builtin:<name>`` in site configs)."""
TRUSTED_KEYS_FILE = BUILTIN_PACKAGES / "trusted.pub"
"""Public key(s) that sign the builtin packages."""
SIGNING_KEY_ENV = "EDGELINE_SIGNING_KEY"
DEFAULT_SIGNING_KEY = Path("~/.config/edgeline/signing.key")
_PEM_PUBLIC_BEGIN = b"-----BEGIN PUBLIC KEY-----"


class SigningError(PackageError):
    """A key that cannot be read or written, or a signature that does not verify."""


# ------------------------------------------------------------------ keys


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex characters of the sha256 of the 32-byte raw public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def default_signing_key_path() -> Path:
    """``$EDGELINE_SIGNING_KEY``, else ``~/.config/edgeline/signing.key``."""
    return Path(os.environ.get(SIGNING_KEY_ENV) or DEFAULT_SIGNING_KEY).expanduser()


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def write_public_key(path: str | Path, public_key: Ed25519PublicKey) -> None:
    """Write a public key as PEM (mode 0644), atomically."""
    _write_atomic(Path(path), public_key_pem(public_key), mode=0o644)


def generate_keypair(
    private_path: str | Path, public_path: str | Path, *, force: bool = False
) -> tuple[Ed25519PrivateKey, Ed25519PublicKey]:
    """Write a new Ed25519 key pair as PEM: the private key with mode 0600, the public key 0644.

    Refuses to overwrite either file unless ``force``.
    """
    private_path, public_path = Path(private_path).expanduser(), Path(public_path).expanduser()
    if private_path.resolve() == public_path.resolve():
        raise SigningError(f"private and public key paths are the same file: {private_path}")
    if not force:
        for path in (private_path, public_path):
            if path.exists():
                raise SigningError(f"{path} already exists; refusing to overwrite it (use force)")
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_atomic(private_path, private_pem, mode=0o600)
    write_public_key(public_path, private_key.public_key())
    log.info("generated signing key %s: %s (public %s)", key_id(private_key.public_key()), private_path, public_path)
    return private_key, private_key.public_key()


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Read a PEM Ed25519 private key; :class:`SigningError` says what is wrong."""
    path = Path(path).expanduser()
    data = _read_key_file(path, "private")
    if _PEM_PUBLIC_BEGIN in data:
        raise SigningError(f"{path}: is a public key; signing needs the private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SigningError(f"{path}: private key is encrypted; only unencrypted keys are supported") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SigningError(f"{path}: not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path}: is a {type(key).__name__.lstrip('_')}, not an Ed25519 private key")
    return key


def load_public_keys(path: str | Path) -> list[Ed25519PublicKey]:
    """Read every PEM Ed25519 public key in a file (one or more ``BEGIN PUBLIC KEY`` blocks)."""
    path = Path(path).expanduser()
    data = _read_key_file(path, "public")
    if b"PRIVATE KEY-----" in data:
        raise SigningError(f"{path}: holds a private key; give the public key (never ship the private one)")
    blocks = [_PEM_PUBLIC_BEGIN + rest for rest in data.split(_PEM_PUBLIC_BEGIN)[1:]]
    if not blocks:
        raise SigningError(f"{path}: no PEM public key in it (expected '{_PEM_PUBLIC_BEGIN.decode()}')")
    keys = []
    for n, block in enumerate(blocks, 1):
        try:
            key = serialization.load_pem_public_key(block)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise SigningError(f"{path}: public key #{n} is not valid PEM ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise SigningError(f"{path}: public key #{n} is a {type(key).__name__.lstrip('_')}, not Ed25519")
        keys.append(key)
    return keys


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Read exactly one PEM Ed25519 public key."""
    keys = load_public_keys(path)
    if len(keys) != 1:
        raise SigningError(f"{path}: holds {len(keys)} public keys, expected one")
    return keys[0]


def builtin_trusted_keys() -> list[Ed25519PublicKey]:
    """The keys that sign the builtin packages (``models/packages/trusted.pub``)."""
    if not TRUSTED_KEYS_FILE.is_file():
        raise SigningError(
            f"{TRUSTED_KEYS_FILE}: missing; the build signs the builtin packages and writes it "
            "(models.package.files.sign_builtin_packages)"
        )
    return load_public_keys(TRUSTED_KEYS_FILE)


class SignatureConfig(Strict):
    """Which model packages a site accepts: signed ones only (``require``), by the builtin key and these."""

    require: bool = Field(True, description="refuse model packages without a valid Ed25519 signature")
    trusted_keys: list[Path] = Field(
        default_factory=list, description="PEM public keys trusted to sign packages, besides the builtin packages' key"
    )


def trusted_keys(signatures: SignatureConfig, base_dir: Path) -> list[Ed25519PublicKey] | None:
    """Keys a package must be signed by (builtin + configured, read from their PEM files), or None
    when signatures are not required."""
    if not signatures.require:
        return None
    keys = builtin_trusted_keys()
    for path in signatures.trusted_keys:
        keys += load_public_keys(base_dir / path)
    return keys


# ------------------------------------------------------------ signatures


def canonical_manifest_bytes(manifest: Manifest) -> bytes:
    """The bytes a signature covers: see the module docstring for the exact rule."""
    data = manifest_json(manifest)
    data.pop("signature", None)
    try:
        text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:
        raise PackageError(f"{_ref(manifest)}: manifest holds NaN or infinity (no canonical JSON form)") from None
    return text.encode("utf-8")


def sign_manifest(manifest: Manifest, private_key: Ed25519PrivateKey) -> Manifest:
    """A copy of ``manifest`` carrying an Ed25519 signature over its canonical bytes."""
    value = private_key.sign(canonical_manifest_bytes(manifest))
    signature = Signature(
        algorithm="ed25519", key_id=key_id(private_key.public_key()), value=base64.b64encode(value).decode("ascii")
    )
    return manifest.model_copy(update={"signature": signature})


def verify_signature(manifest: Manifest, trusted_keys: Iterable[Ed25519PublicKey]) -> str:
    """Check the manifest's signature against the trusted keys; returns the signing key id.

    Raises :class:`SigningError`: not signed, signed by a key that is not trusted, or a signature
    that does not verify (the manifest was changed after signing, or the signature was forged).
    """
    trusted = {key_id(key): key for key in trusted_keys}
    if manifest.signature is None:
        raise SigningError(f"package {_ref(manifest)} is not signed")
    signer = manifest.signature.key_id
    if signer not in trusted:
        known = ", ".join(sorted(trusted)) or "none"
        raise SigningError(
            f"package {_ref(manifest)} is signed by key {signer}, which is not trusted (trusted: {known})"
        )
    try:
        trusted[signer].verify(base64.b64decode(manifest.signature.value), canonical_manifest_bytes(manifest))
    except InvalidSignature:
        raise SigningError(
            f"package {_ref(manifest)}: signature does not verify with key {signer} "
            "(the manifest was changed after signing, or the signature is not genuine)"
        ) from None
    return signer


def ensure_signing_key(key_path: str | Path | None = None) -> tuple[Ed25519PrivateKey, Path | None]:
    """The private key at ``key_path`` (default :func:`default_signing_key_path`), generated on first use
    (mode 0600, its public half beside it as ``<name>.pub``); returns the key and the path it was created at
    (None when it already existed)."""
    key_path = Path(key_path).expanduser() if key_path is not None else default_signing_key_path()
    if key_path.exists():
        return load_private_key(key_path), None
    key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    private_key = _generate_private_only(key_path)
    write_public_key(key_path.with_name(key_path.name + ".pub"), private_key.public_key())
    return private_key, key_path


# --------------------------------------------------------------- helpers


def _ref(manifest: Manifest) -> str:
    return f"{manifest.name}:{manifest.version}"


def _generate_private_only(path: Path) -> Ed25519PrivateKey:
    private_key = Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_atomic(path, pem, mode=0o600)
    log.info("generated signing key %s at %s", key_id(private_key.public_key()), path)
    return private_key


def _read_key_file(path: Path, kind: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SigningError(f"{path}: {kind} key file not found") from None
    except OSError as exc:
        raise SigningError(f"{path}: cannot read {kind} key file: {exc.strerror or exc}") from None


def _write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Write through a temp file created with ``mode`` (never world-readable in between)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)  # the umask may have cleared bits we asked for
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

