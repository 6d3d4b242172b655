import base64
import json
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from models.package.files import load_package, sign_builtin_packages, sign_package, write_package
from models.package.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, PackageError, read_manifest
from models.package.signing import (
    BUILTIN_PACKAGES,
    SigningError,
    builtin_trusted_keys,
    canonical_manifest_bytes,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    load_public_keys,
    verify_signature,
)
from tests.unit.models.package.test_files import seg_manifest


@pytest.fixture(scope="module")
def key():
    return Ed25519PrivateKey.generate()


@pytest.fixture
def signed(tmp_path, key):
    write_package(tmp_path / "pkg", seg_manifest(), b"fake onnx bytes")
    sign_package(tmp_path / "pkg", key)
    return tmp_path / "pkg"


def edit_manifest(folder, change):
    data = json.loads((folder / MANIFEST_FILE).read_text())
    change(data)
    (folder / MANIFEST_FILE).write_text(json.dumps(data, indent=2))


# ------------------------------------------------------------------ keys


def test_generate_keypair_writes_pem_with_private_mode_0600(tmp_path):
    private, public = generate_keypair(tmp_path / "k", tmp_path / "k.pub")
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert (tmp_path / "k").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert (tmp_path / "k.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert key_id(load_private_key(tmp_path / "k").public_key()) == key_id(public)
    assert key_id(load_public_key(tmp_path / "k.pub")) == key_id(private.public_key())


def test_generate_keypair_refuses_to_overwrite_without_force(tmp_path):
    generate_keypair(tmp_path / "k", tmp_path / "k.pub")
    before = (tmp_path / "k").read_bytes()
    with pytest.raises(SigningError, match="already exists; refusing to overwrite"):
        generate_keypair(tmp_path / "k", tmp_path / "other.pub")
    assert (tmp_path / "k").read_bytes() == before and not (tmp_path / "other.pub").exists()
    generate_keypair(tmp_path / "k", tmp_path / "k.pub", force=True)
    assert (tmp_path / "k").read_bytes() != before
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600


def test_key_id_is_16_hex_of_the_raw_public_key(key):
    import hashlib

    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(key.public_key()) == hashlib.sha256(raw).hexdigest()[:16]


def test_key_loading_errors_are_clear(tmp_path):
    generate_keypair(tmp_path / "k", tmp_path / "k.pub")
    with pytest.raises(SigningError, match="private key file not found"):
        load_private_key(tmp_path / "nope")
    with pytest.raises(SigningError, match="is a public key; signing needs the private key"):
        load_private_key(tmp_path / "k.pub")
    with pytest.raises(SigningError, match="holds a private key"):
        load_public_keys(tmp_path / "k")
    (tmp_path / "junk").write_text("hello")
    with pytest.raises(SigningError, match="no PEM public key"):
        load_public_keys(tmp_path / "junk")
    with pytest.raises(SigningError, match="not a PEM private key"):
        load_private_key(tmp_path / "junk")


def test_public_key_file_may_hold_several_keys(tmp_path):
    _, a = generate_keypair(tmp_path / "a", tmp_path / "a.pub")
    _, b = generate_keypair(tmp_path / "b", tmp_path / "b.pub")
    (tmp_path / "both.pub").write_bytes((tmp_path / "a.pub").read_bytes() + (tmp_path / "b.pub").read_bytes())
    assert [key_id(k) for k in load_public_keys(tmp_path / "both.pub")] == [key_id(a), key_id(b)]
    with pytest.raises(SigningError, match="holds 2 public keys, expected one"):
        load_public_key(tmp_path / "both.pub")


# ------------------------------------------------------- canonical bytes


def test_canonical_bytes_are_sorted_compact_utf8_without_signature(signed):
    manifest = read_manifest(signed)
    raw = canonical_manifest_bytes(manifest)
    data = json.loads((signed / MANIFEST_FILE).read_text())
    del data["signature"]
    expected = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert raw == expected  # reproducible from the file alone
    assert b"signature" not in raw and b" " not in raw.replace(b"fake onnx", b"")


def test_canonical_bytes_are_stable_and_ignore_field_order():
    manifest = seg_manifest(metrics={"iou": 0.8, "größe": 1.5})
    data = manifest.model_dump(mode="json")
    reordered = {k: (dict(reversed(v.items())) if isinstance(v, dict) else v) for k, v in reversed(data.items())}
    assert list(reordered) != list(data)
    a = canonical_manifest_bytes(Manifest.model_validate(data))
    b = canonical_manifest_bytes(Manifest.model_validate_json(json.dumps(reordered)))
    assert a == b == canonical_manifest_bytes(Manifest.model_validate(data))
    assert "größe".encode() in a  # UTF-8, not \\u escapes


def test_canonical_bytes_refuse_nan():
    with pytest.raises(PackageError, match="NaN or infinity"):
        canonical_manifest_bytes(seg_manifest(metrics={"iou": float("nan")}))


# -------------------------------------------------------------- signing


def test_sign_and_verify_round_trip(signed, key):
    data = json.loads((signed / MANIFEST_FILE).read_text())
    assert set(data["signature"]) == {"algorithm", "key_id", "value"}
    assert data["signature"]["algorithm"] == "ed25519"
    assert data["signature"]["key_id"] == key_id(key.public_key())
    assert len(base64.b64decode(data["signature"]["value"])) == 64
    package = load_package(signed, trusted_keys=[key.public_key()])
    assert package.key_id == key_id(key.public_key())
    stranger = Ed25519PrivateKey.generate().public_key()
    assert verify_signature(package.manifest, [stranger, key.public_key()]) == package.key_id
    assert load_package(signed).key_id is None  # no trusted keys: checksums only


def test_tampered_model_is_refused_even_when_signed(signed, key):
    (signed / MODEL_FILE).write_bytes(b"fake onnx bytez")
    with pytest.raises(PackageError, match="checksum mismatch for model.onnx"):
        load_package(signed, trusted_keys=[key.public_key()])


def test_manifest_changed_after_signing_does_not_verify(signed, key):
    edit_manifest(signed, lambda d: d["metrics"].update(iou=0.99))
    with pytest.raises(SigningError, match="signature does not verify"):
        load_package(signed, trusted_keys=[key.public_key()])
    load_package(signed)  # checksums alone still pass: only the signature catches this


def test_checksum_and_model_swapped_together_does_not_verify(signed, key):
    (signed / MODEL_FILE).write_bytes(b"evil")
    edit_manifest(signed, lambda d: d["files"].update({MODEL_FILE: __import__("hashlib").sha256(b"evil").hexdigest()}))
    with pytest.raises(SigningError, match="signature does not verify"):
        load_package(signed, trusted_keys=[key.public_key()])


def test_missing_signature_is_refused_when_keys_are_required(tmp_path, key):
    write_package(tmp_path / "pkg", seg_manifest(), b"x")
    with pytest.raises(SigningError, match=r"package seg-test:0.0.1 is not signed"):
        load_package(tmp_path / "pkg", trusted_keys=[key.public_key()])


def test_wrong_key_is_refused(signed, key):
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(SigningError, match=rf"signed by key {key_id(key.public_key())}, which is not trusted"):
        load_package(signed, trusted_keys=[other])
    with pytest.raises(SigningError, match="not trusted"):
        load_package(signed, trusted_keys=[])


def test_forged_key_id_does_not_verify(signed, key):
    other = Ed25519PrivateKey.generate()
    sign_package(signed, other)
    edit_manifest(signed, lambda d: d["signature"].update(key_id=key_id(key.public_key())))
    with pytest.raises(SigningError, match="signature does not verify"):
        load_package(signed, trusted_keys=[key.public_key()])


def test_malformed_signature_is_a_bad_manifest(signed):
    edit_manifest(signed, lambda d: d["signature"].update(value=base64.b64encode(b"short").decode()))
    with pytest.raises(PackageError, match="signature.value.*64 bytes"):
        load_package(signed)
    edit_manifest(signed, lambda d: d["signature"].update(algorithm="rsa"))
    with pytest.raises(PackageError, match="signature.algorithm"):
        load_package(signed)


def test_sign_package_verifies_checksums_first_and_changes_nothing(tmp_path, key):
    write_package(tmp_path / "pkg", seg_manifest(), b"x")
    (tmp_path / "pkg" / MODEL_FILE).write_bytes(b"y")
    before = (tmp_path / "pkg" / MANIFEST_FILE).read_bytes()
    with pytest.raises(PackageError, match="checksum mismatch"):
        sign_package(tmp_path / "pkg", key)
    assert (tmp_path / "pkg" / MANIFEST_FILE).read_bytes() == before


def test_resigning_replaces_the_signature(signed, key):
    other = Ed25519PrivateKey.generate()
    assert sign_package(signed, other).key_id == key_id(other.public_key())
    with pytest.raises(SigningError, match="not trusted"):
        load_package(signed, trusted_keys=[key.public_key()])


def test_write_package_drops_a_stale_signature(signed, key):
    manifest = load_package(signed).manifest
    assert manifest.signature is not None
    assert write_package(signed, manifest, b"new bytes").manifest.signature is None


def test_signature_covers_the_keys_in_the_file_so_new_schema_defaults_keep_it_valid(tmp_path, key):
    """An older manifest lacks fields the schema gained since; signing and verifying must not add them."""
    write_package(tmp_path / "pkg", seg_manifest(), b"x")
    edit_manifest(tmp_path / "pkg", lambda d: (d.pop("bench"), d["postprocess"].pop("min_area")))
    sign_package(tmp_path / "pkg", key)
    data = json.loads((tmp_path / "pkg" / MANIFEST_FILE).read_text())
    assert "bench" not in data and "min_area" not in data["postprocess"]
    package = load_package(tmp_path / "pkg", trusted_keys=[key.public_key()])
    assert package.manifest.bench == {} and package.manifest.postprocess.min_area == 0


# ------------------------------------------------------ builtin packages


def test_sign_builtin_packages_generates_the_key_signs_all_and_writes_trusted_pub(tmp_path):
    packages = tmp_path / "packages"
    write_package(packages / "a", seg_manifest(name="a"), b"a")
    write_package(packages / "b", seg_manifest(name="b"), b"b")
    (packages / "not-a-package").mkdir()
    key_path = tmp_path / "cfg" / "signing.key"
    signed = sign_builtin_packages(packages, key_path)
    assert [p.ref for p in signed] == ["a:0.0.1", "b:0.0.1"]
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    trusted = load_public_keys(packages / "trusted.pub")
    assert [key_id(k) for k in trusted] == [key_id(load_private_key(key_path).public_key())]
    for name in ("a", "b"):
        load_package(packages / name, trusted_keys=trusted)
    again = sign_builtin_packages(packages, key_path)  # the existing key is reused
    assert {p.key_id for p in again} == {key_id(trusted[0])}


def test_sign_builtin_packages_uses_the_env_key_path(tmp_path, monkeypatch):
    write_package(tmp_path / "packages" / "a", seg_manifest(name="a"), b"a")
    monkeypatch.setenv("EDGELINE_SIGNING_KEY", str(tmp_path / "env.key"))
    sign_builtin_packages(tmp_path / "packages")
    assert (tmp_path / "env.key").is_file()


@pytest.mark.parametrize("name", ["seg-synth-int8", "seg-tiles-int8", "anomaly-skab"])
def test_committed_builtin_packages_verify_against_trusted_pub(name):
    package = load_package(BUILTIN_PACKAGES / name, trusted_keys=builtin_trusted_keys())
    assert package.key_id == key_id(builtin_trusted_keys()[0])
