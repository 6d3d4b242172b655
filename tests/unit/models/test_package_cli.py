import json
import shutil
import stat

import pytest
import typer
import yaml
from typer.testing import CliRunner

from models.package import MANIFEST_FILE, MODEL_FILE, load_package
from models.package_cli import register
from models.package.signing import (
    BUILTIN_PACKAGES,
    builtin_trusted_keys,
    generate_keypair,
    key_id,
    load_public_keys,
)

SEG = BUILTIN_PACKAGES / "seg-synth-int8"


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()
    register(app)
    return app


@pytest.fixture
def run(app):
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke


@pytest.fixture
def keys(tmp_path):
    _private, public = generate_keypair(tmp_path / "dev.key", tmp_path / "dev.pub")
    return tmp_path / "dev.key", tmp_path / "dev.pub", key_id(public)


@pytest.fixture
def template(tmp_path):
    data = json.loads((SEG / MANIFEST_FILE).read_text())
    del data["files"], data["signature"]
    data["name"] = "seg-cli"
    path = tmp_path / "template.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def unsigned(tmp_path, run, template):
    result = run("package", SEG / MODEL_FILE, "--manifest", template, "--out", tmp_path / "pkg")
    assert result.exit_code == 0, result.output
    return tmp_path / "pkg"


@pytest.fixture
def signed(run, unsigned, keys):
    assert run("sign", unsigned, "--key", keys[0]).exit_code == 0
    return unsigned


def test_keygen_writes_a_0600_key_and_refuses_to_overwrite(tmp_path, run):
    result = run("keygen", "--private", tmp_path / "k", "--public", tmp_path / "k.pub")
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    kid = key_id(load_public_keys(tmp_path / "k.pub")[0])
    assert kid in result.stdout
    result = run("keygen", "--private", tmp_path / "k", "--public", tmp_path / "k.pub")
    assert result.exit_code == 1
    assert "already exists; refusing to overwrite" in result.stderr
    assert key_id(load_public_keys(tmp_path / "k.pub")[0]) == kid
    assert run("keygen", "--private", tmp_path / "k", "--public", tmp_path / "k.pub", "--force").exit_code == 0
    assert key_id(load_public_keys(tmp_path / "k.pub")[0]) != kid


def test_package_builds_a_checked_unsigned_folder(unsigned):
    package = load_package(unsigned)
    assert package.ref == "seg-cli:1.0.0"
    assert package.model_path.read_bytes() == (SEG / MODEL_FILE).read_bytes()
    assert package.manifest.signature is None


def test_package_from_yaml_template_signed_as_tar(tmp_path, run, template, keys):
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(json.loads(template.read_text())))
    result = run("package", SEG / MODEL_FILE, "--manifest", tmp_path / "t.yaml", "--out", tmp_path / "out",
                 "--tar", "--key", keys[0])
    assert result.exit_code == 0, result.output
    assert f"signed by key {keys[2]}" in result.stdout
    assert not (tmp_path / "out").exists()
    result = run("verify", tmp_path / "out.tar.gz", "--key", keys[1])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == keys[2]


def test_package_refuses_a_template_with_files_or_signature(tmp_path, run):
    result = run("package", SEG / MODEL_FILE, "--manifest", SEG / MANIFEST_FILE, "--out", tmp_path / "pkg")
    assert result.exit_code == 1
    assert "the template sets 'files'" in result.stderr
    assert not (tmp_path / "pkg").exists()


def test_package_refuses_a_graph_that_does_not_match_the_manifest(tmp_path, run, template):
    data = json.loads(template.read_text())
    data["inputs"][0]["name"] = "pixels"
    template.write_text(json.dumps(data))
    result = run("package", SEG / MODEL_FILE, "--manifest", template, "--out", tmp_path / "pkg")
    assert result.exit_code == 1
    assert "graph inputs" in result.stderr and "do not match" in result.stderr


def test_package_refuses_an_invalid_template_or_model(tmp_path, run, template):
    data = json.loads(template.read_text())
    data["task"] = "anomaly"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    result = run("package", SEG / MODEL_FILE, "--manifest", tmp_path / "bad.json", "--out", tmp_path / "a")
    assert result.exit_code == 1 and "bad manifest template" in result.stderr
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    result = run("package", tmp_path / "junk.onnx", "--manifest", template, "--out", tmp_path / "b")
    assert result.exit_code == 1 and "not a loadable ONNX model" in result.stderr


def test_package_refuses_an_existing_output(run, unsigned, template):
    result = run("package", SEG / MODEL_FILE, "--manifest", template, "--out", unsigned)
    assert result.exit_code == 1 and "already exists" in result.stderr


def test_sign_then_verify_prints_the_key_id(run, signed, keys):
    result = run("verify", signed, "--key", keys[1])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == keys[2]


def test_sign_a_tar_in_place(tmp_path, run, unsigned, keys):
    from models.package import write_package_tar

    tar_path = write_package_tar(unsigned, tmp_path / "p.tar.gz")
    assert run("sign", tar_path, "--key", keys[0]).exit_code == 0
    result = run("verify", tar_path, "--key", keys[1])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == keys[2]


def test_sign_refuses_a_tampered_package(run, unsigned, keys):
    (unsigned / MODEL_FILE).write_bytes(b"tampered")
    result = run("sign", unsigned, "--key", keys[0])
    assert result.exit_code == 1 and "checksum mismatch for model.onnx" in result.stderr


def test_sign_refuses_a_public_key(run, unsigned, keys):
    result = run("sign", unsigned, "--key", keys[1])
    assert result.exit_code == 1 and "is a public key" in result.stderr


def test_verify_unsigned(run, unsigned, keys):
    result = run("verify", unsigned, "--key", keys[1])
    assert result.exit_code == 1
    assert "package seg-cli:1.0.0 is not signed" in result.stderr


def test_verify_wrong_key(tmp_path, run, signed, keys):
    _, _other = generate_keypair(tmp_path / "o.key", tmp_path / "o.pub")
    result = run("verify", signed, "--key", tmp_path / "o.pub")
    assert result.exit_code == 1
    assert f"signed by key {keys[2]}, which is not trusted" in result.stderr
    assert run("verify", signed, "--key", tmp_path / "o.pub", "--key", keys[1]).exit_code == 0


def test_verify_tampered_manifest(run, signed, keys):
    data = json.loads((signed / MANIFEST_FILE).read_text())
    data["metrics"]["fresh_iou"] = 0.99
    (signed / MANIFEST_FILE).write_text(json.dumps(data))
    result = run("verify", signed, "--key", keys[1])
    assert result.exit_code == 1 and "signature does not verify" in result.stderr


def test_verify_tampered_model(run, signed, keys):
    (signed / MODEL_FILE).write_bytes(b"tampered")
    result = run("verify", signed, "--key", keys[1])
    assert result.exit_code == 1 and "checksum mismatch for model.onnx" in result.stderr


def test_verify_missing_file_and_missing_key_file(tmp_path, run, signed, keys):
    result = run("verify", signed, "--key", tmp_path / "nope.pub")
    assert result.exit_code == 1 and "public key file not found" in result.stderr
    (signed / MODEL_FILE).unlink()
    result = run("verify", signed, "--key", keys[1])
    assert result.exit_code == 1 and "missing file model.onnx" in result.stderr


def test_verify_defaults_to_the_builtin_trusted_keys(run):
    result = run("verify", SEG)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == key_id(builtin_trusted_keys()[0])


def test_inspect_shows_the_package_and_its_signature(run):
    result = run("inspect", SEG)
    assert result.exit_code == 0, result.output
    out = result.stdout
    size = f"{(SEG / MODEL_FILE).stat().st_size:,}"
    for text in ("seg-synth", "1.0.0", "segmentation", "int8", "image", "prob", "threshold", "image_recall",
                 "ms_per_frame_batch1", MODEL_FILE, size, "ok", key_id(builtin_trusted_keys()[0]), "verifies"):
        assert text in out, text


def test_inspect_shows_problems(tmp_path, run, signed):
    result = run("inspect", signed)
    assert result.exit_code == 0 and "not a builtin trusted key" in result.stdout
    copy = tmp_path / "copy"
    shutil.copytree(signed, copy)
    (copy / MODEL_FILE).write_bytes(b"tampered")
    data = json.loads((copy / MANIFEST_FILE).read_text())
    data["signature"] = None
    (copy / MANIFEST_FILE).write_text(json.dumps(data))
    result = run("inspect", copy)
    assert result.exit_code == 0
    assert "mismatch" in result.stdout and "not signed" in result.stdout


def test_inspect_missing_package(tmp_path, run):
    result = run("inspect", tmp_path / "nope")
    assert result.exit_code == 1 and "no such package folder or file" in result.stderr
    tmp_path.joinpath("empty").mkdir()
    result = run("inspect", tmp_path / "empty")
    assert result.exit_code == 1 and "missing file manifest.json" in result.stderr


def test_inspect_json_is_the_manifest_and_the_file_checks(run):
    result = run("inspect", SEG, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["package"] == "seg-synth-1.0.0-int8" and data["manifest"]["precision"] == "int8"
    assert data["signature"].endswith("verifies (builtin trusted key)")
    assert {f["file"]: f["check"] for f in data["files"]}[MODEL_FILE] == "ok"
