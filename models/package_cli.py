"""``edgeline models keygen|package|sign|verify|inspect``: build, sign and check model packages.

Mounted by ``edgeline.cli`` through :func:`register`. No torch here. Exit codes: 0 ok, 1 the
package or key was refused (the message says why), 2 bad arguments (typer's usage errors).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from models.package import (
    MANIFEST_FILE,
    MODEL_FILE,
    Manifest,
    Package,
    PackageError,
    SigningError,
    builtin_trusted_keys,
    extract_package_tar,
    generate_keypair,
    is_package_tar,
    key_id,
    load_package,
    load_private_key,
    load_public_keys,
    read_manifest,
    sha256_file,
    sign_package,
    verify_signature,
    write_package,
    write_package_tar,
)
from stream.console import Column, TableOutput, print_json, print_table

console = Console()
err_console = Console(stderr=True)

PackageArg = Annotated[Path, typer.Argument(help="package folder or .tar/.tar.gz file", show_default=False)]


def register(app: typer.Typer) -> None:
    """Add the package commands to ``app`` (``edgeline models``)."""
    app.command("keygen")(keygen)
    app.command("package")(package)
    app.command("sign")(sign)
    app.command("verify")(verify)
    app.command("inspect")(inspect)


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {_escape(message)}", soft_wrap=True, highlight=False)
    return typer.Exit(1)


def _say(text: str, err: bool = False) -> None:
    """One plain line (no markup, no wrapping: scripts and tests read it)."""
    (err_console if err else console).print(text, markup=False, highlight=False, soft_wrap=True)


def _escape(text: str) -> str:
    return escape(text)


def keygen(
    private: Annotated[Path, typer.Option("--private", help="private key file to write (PEM, mode 0600)")],
    public: Annotated[Path, typer.Option("--public", help="public key file to write (PEM)")],
    force: Annotated[bool, typer.Option("--force", help="overwrite existing key files")] = False,
) -> None:
    """Generate an Ed25519 signing key pair."""
    try:
        _, public_key = generate_keypair(private, public, force=force)
    except (SigningError, OSError) as exc:
        raise _fail(str(exc)) from None
    _say(f"key {key_id(public_key)}: private {private}, public {public}")


def package(
    model: Annotated[Path, typer.Argument(help="the ONNX model file", show_default=False)],
    manifest: Annotated[Path, typer.Option("--manifest", help="manifest template (.json or .yaml), without files "
                                           "and signature")],
    out: Annotated[Path, typer.Option("--out", help="package folder to create (with --tar: the tar file)")],
    tar: Annotated[bool, typer.Option("--tar", help="write a .tar.gz (OUT, or OUT.tar.gz), not a folder")] = False,
    key: Annotated[Path | None, typer.Option("--key", help="also sign with this private key")] = None,
) -> None:
    """Build a package from an ONNX model and a manifest template: checksums, validation, optional signature."""
    try:
        template = _read_template(manifest)
        onnx_bytes = model.read_bytes()
        try:
            checked = Manifest.model_validate(template)
        except ValidationError as exc:
            raise PackageError(f"{manifest}: bad manifest template: {_problems(exc)}") from None
        _check_graph(model, checked)
        private_key = load_private_key(key) if key is not None else None
        if tar:
            tar_path = out if is_package_tar(out) else out.with_name(out.name + ".tar.gz")
            _refuse_existing(tar_path)
            with tempfile.TemporaryDirectory() as tmp:
                built = _build(Path(tmp) / "pkg", checked, onnx_bytes, private_key)
                write_package_tar(built.folder, tar_path)
            where = tar_path
        else:
            _refuse_existing(out)
            built = _build(out, checked, onnx_bytes, private_key)
            where = out
    except (PackageError, OSError) as exc:
        raise _fail(str(exc)) from None
    signed = f", signed by key {built.key_id}" if built.key_id else ", unsigned"
    _say(f"{built.ref} ({built.manifest.task}, {built.manifest.precision}) -> {where}{signed}")


def sign(
    path: PackageArg,
    key: Annotated[Path, typer.Option("--key", help="private key (PEM)")],
) -> None:
    """Sign a package (folder or tar) in place, after checking its checksums."""
    try:
        private_key = load_private_key(key)
        with _editable(path) as folder:
            signed = sign_package(folder, private_key)
    except (PackageError, OSError) as exc:
        raise _fail(str(exc)) from None
    _say(f"{signed.ref}: signed by key {signed.key_id} ({path})")


def verify(
    path: PackageArg,
    key: Annotated[list[Path] | None, typer.Option("--key", help="trusted public key file (repeatable); "
                                                      "default: the builtin trusted keys")] = None,
) -> None:
    """Check a package's checksums and its signature by a trusted key; prints the signing key id."""
    try:
        trusted = [k for path_ in key for k in load_public_keys(path_)] if key else builtin_trusted_keys()
        with tempfile.TemporaryDirectory() as cache:
            verified = load_package(path, trusted_keys=trusted, cache_dir=cache)
    except (PackageError, OSError) as exc:
        raise _fail(str(exc)) from None
    _say(f"{verified.key_id}")
    _say(f"ok: {verified.ref} signed by key {verified.key_id}; checksums match", err=True)


def inspect(
    path: PackageArg,
    as_json: Annotated[bool, typer.Option("--json", help="print the manifest and file checks as JSON")] = False,
) -> None:
    """Show a package: what it is, its files and checksums, and its signature."""
    try:
        if not path.exists():
            raise PackageError(f"{path}: no such package folder or file")
        with tempfile.TemporaryDirectory() as cache:
            folder = extract_package_tar(path, cache) if path.is_file() and is_package_tar(path) else path
            manifest = read_manifest(folder, label=path)
            files = _file_checks(folder, manifest)
    except (PackageError, OSError) as exc:
        raise _fail(str(exc)) from None
    signature = _signature_status(manifest)
    if as_json:
        print_json({"package": manifest.package_id, "manifest": manifest.model_dump(mode="json"),
                    "signature": signature.plain, "files": files})
        return
    print_table(_summary(path, manifest, signature), console)
    print_table(_files_table(files), console)


# ---------------------------------------------------------------- helpers


def _read_template(path: Path) -> dict[str, Any]:
    text = path.read_text()
    is_yaml = path.suffix in (".yaml", ".yml")
    try:
        data = yaml.safe_load(text) if is_yaml else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise PackageError(f"{path}: not valid {'YAML' if is_yaml else 'JSON'}: {exc}") from None
    if not isinstance(data, dict):
        raise PackageError(f"{path}: a manifest template is a mapping, got {type(data).__name__}")
    for computed in ("files", "signature"):
        if computed in data:
            raise PackageError(f"{path}: the template sets {computed!r}; leave it out, the package command computes it")
    return data


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'manifest'}: {e['msg']}" for e in exc.errors(include_url=False)[:5]
    )


def _check_graph(model: Path, manifest: Manifest) -> None:
    """The ONNX graph must load and have the manifest's input and output names, in order, and ranks."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own Exception subclasses, one per failure kind
        raise PackageError(f"{model}: not a loadable ONNX model ({str(exc).splitlines()[0]})") from None
    for kind, graph, specs in (("inputs", session.get_inputs(), manifest.inputs),
                               ("outputs", session.get_outputs(), manifest.outputs)):
        got = [(t.name, len(t.shape)) for t in graph]
        want = [(s.name, len(s.shape)) for s in specs]
        if got != want:
            raise PackageError(f"{model}: graph {kind} (name, rank) {got} do not match the manifest's {want}")


def _refuse_existing(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise PackageError(f"{path}: already exists; choose another --out or remove it")


def _build(folder: Path, manifest: Manifest, onnx_bytes: bytes, private_key: Any) -> Package:
    built = write_package(folder, manifest, onnx_bytes)
    return sign_package(folder, private_key) if private_key is not None else built


@contextmanager
def _editable(path: Path) -> Iterator[Path]:
    """A package folder to change in place; for a tar, a temp copy written back on success."""
    if path.is_dir():
        yield path
        return
    if not (path.is_file() and is_package_tar(path)):
        raise PackageError(f"{path}: no such package folder or .tar/.tar.gz file")
    with tempfile.TemporaryDirectory() as tmp:
        folder = extract_package_tar(path, tmp)
        yield folder
        write_package_tar(folder, path)
        shutil.rmtree(folder, ignore_errors=True)


def _signature_status(manifest: Manifest) -> Text:
    if manifest.signature is None:
        return Text("not signed", style="yellow")
    try:
        trusted = builtin_trusted_keys()
    except SigningError as exc:
        return Text(f"key {manifest.signature.key_id}; cannot check: {exc}", style="yellow")
    try:
        signer = verify_signature(manifest, trusted)
    except SigningError as exc:
        reason = "not a builtin trusted key" if "not trusted" in str(exc) else "does NOT verify"
        return Text(f"key {manifest.signature.key_id}; {reason}", style="red")
    return Text(f"key {signer}; verifies (builtin trusted key)", style="green")


def _tensors(specs: list[Any]) -> str:
    return "\n".join(f"{s.name} {s.dtype} [{', '.join(str(d) for d in s.shape)}]" for s in specs)


def _numbers(values: dict[str, float]) -> str:
    return "\n".join(f"{k} = {v:.6g}" for k, v in sorted(values.items())) or "-"


def _fields(model: Any) -> str:
    return "\n".join(f"{k} = {v}" for k, v in model.model_dump(mode="json").items() if k != "kind")


def _summary(path: Path, manifest: Manifest, signature: Text) -> TableOutput:
    rows = [
        ("package", manifest.package_id),
        ("name", manifest.name),
        ("version", manifest.version),
        ("task", manifest.task),
        ("precision", manifest.precision),
        ("created", manifest.created.isoformat()),
        ("inputs", _tensors(manifest.inputs)),
        ("outputs", _tensors(manifest.outputs)),
        ("preprocess", _fields(manifest.preprocess)),
        ("postprocess", _fields(manifest.postprocess)),
        ("metrics", _numbers(manifest.metrics)),
        ("bench", _numbers(manifest.bench)),
    ]
    return TableOutput([Column("field", key=True), "value"], [*rows, ("signature", signature)],
                       f"{manifest.package_id} ({path})")


def _file_checks(folder: Path, manifest: Manifest) -> list[dict[str, Any]]:
    """Each listed file with its size and whether its sha256 matches; the manifest; an unlisted model."""
    checks: list[dict[str, Any]] = []
    for name, expected in sorted(manifest.files.items()):
        path = folder / name
        present = path.is_file()
        check = "missing" if not present else "ok" if sha256_file(path) == expected else "mismatch"
        checks.append({"file": name, "bytes": path.stat().st_size if present else None, "sha256": expected,
                       "check": check})
    checks.append({"file": MANIFEST_FILE, "bytes": (folder / MANIFEST_FILE).stat().st_size, "sha256": None,
                   "check": "not listed: holds the checksums"})
    if MODEL_FILE not in manifest.files:
        checks.append({"file": MODEL_FILE, "bytes": None, "sha256": None, "check": "not listed"})
    return checks


def _files_table(files: list[dict[str, Any]]) -> TableOutput:
    styles = {"ok": "green", "missing": "red", "mismatch": "red", "not listed": "red"}
    return TableOutput([Column("file", key=True), Column("bytes", numeric=True), Column("sha256", key=True), "check"],
                       [[f["file"], "-" if f["bytes"] is None else f"{f['bytes']:,}", (f["sha256"] or "-")[:16],
                         Text(f["check"], style=styles.get(f["check"], ""))] for f in files], "files")
