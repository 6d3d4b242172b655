"""Site configuration: valid files load; every bad file names the YAML path of each problem."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgeline.cli import app
from edgeline.config import ConfigError, from_dict, load, yaml_path

REPO = Path(__file__).resolve().parents[3]

GOOD = """
site: s1
models:
  seg: {path: "builtin:seg-synth-int8"}
camera_defaults: {fps: 12, resolution: [640, 480]}
machines:
  - id: m1
    cameras:
      - id: c1
        models: [seg]
      - id: c2
        fps: 3
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, text))
    return caught.value.problems


def test_example_site_loads() -> None:
    config = load(REPO / "config" / "site.yaml")
    assert config.site == "plant-a"
    assert [len(m.cameras) for m in config.machines] == [2, 3, 2]
    assert config.machines[0].cameras[1].models == []


def test_camera_defaults_are_merged_after_validation(tmp_path: Path) -> None:
    config = load(write(tmp_path, GOOD))
    first, second = config.machines[0].cameras
    assert (first.fps, first.resolution, first.queue_size) == (12, (640, 480), 2)
    assert (second.fps, second.resolution) == (3, (640, 480))


def test_too_many_models_names_the_camera(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, """
        site: s1
        models:
          seg: {path: "builtin:seg-synth-int8"}
        machines:
          - id: m0
          - id: m1
            cameras:
              - id: c1
                models: [seg, a, b]
        """)
    assert problems == ["machines[1].cameras[0].models: at most 2 models per camera (got 3)"]


def test_unknown_model_and_missing_package_and_file(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, """
        site: s1
        models:
          seg: {path: "builtin:seg-synth-int8"}
          gone: {path: "no/such/package"}
        machines:
          - id: m1
            cameras:
              - id: c1
                models: [seg, segx]
              - id: c2
                source: {type: file, path: missing.mp4}
            sensors:
              - id: p1
                model: nope
        """)
    assert problems[0].startswith("models.gone.path: no model package (folder with manifest.json, or .tar) at ")
    assert "machines[0].cameras[0].models[1]: unknown model 'segx' (known: gone, seg)" in problems
    assert "machines[0].cameras[1].source.path: file not found: missing.mp4" in problems
    assert "machines[0].sensors[0].model: unknown model 'nope' (known: gone, seg)" in problems
    assert len(problems) == 4


def test_type_errors_unknown_fields_and_bad_union_tags(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, """
        site: "bad site/with slash"
        broker: {port: 70000}
        machines:
          - id: m1
            cameras:
              - id: c1
                fps: 0
                colour: red
              - id: c2
                source: {type: webcam}
              - id: c3
                source: {type: rtsp, url: "ftp://x"}
        """)
    assert problems[0].startswith("site: String should match pattern")
    assert problems[1] == "broker.port: Input should be less than or equal to 65535"
    assert "machines[0].cameras[0].fps: Input should be greater than 0" in problems
    assert "machines[0].cameras[0].colour: unknown field" in problems
    assert any(p.startswith("machines[0].cameras[1].source: type 'webcam' does not match") for p in problems)
    assert any(p.startswith("machines[0].cameras[2].source.url: String should match pattern") for p in problems)


def test_rule_with_k_above_n(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, """
        site: s1
        rules:
          - {name: r1, metric: defect_ratio, condition: {value: 0.1}, k: 3, n: 2, kind: k_of_n}
          - {name: r2, metric: pressure, condition: {value: 1}}
        """)
    assert problems[0] == "rules[0]: k (3) must not exceed n (2)"
    assert problems[1].startswith("rules[1].metric: Input should be 'defect_ratio'")


def test_duplicates_reported_after_schema_passes(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, """
        site: s1
        machines:
          - id: m1
            cameras: [{id: c1}, {id: c1}]
          - id: m1
        rules:
          - {name: r1, metric: defect_ratio, condition: {value: 0.1}}
          - {name: r1, metric: anomaly_score, condition: {value: 2}}
        """)
    assert problems == [
        "machines[1].id: duplicate machine id 'm1'",
        "rules[1].id: duplicate rule name 'r1'",
        "machines[0].cameras[1].id: duplicate camera id 'c1'",
    ]


def test_missing_required_and_not_a_mapping(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "machines: []\n") == ["site: Field required"]
    assert problems_of(tmp_path, "- just\n- a list\n") == ["(top level): expected a mapping, got list"]


def test_yaml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "site: [unclosed\n")[0].startswith("not valid YAML:")
    with pytest.raises(ConfigError) as caught:
        load(tmp_path / "absent.yaml")
    assert caught.value.problems[0].startswith("cannot read file")


def test_yaml_path_skips_union_tags_but_keeps_missing_keys() -> None:
    raw = {"machines": [{"cameras": [{"source": {"type": "file"}}]}]}
    assert yaml_path(("machines", 0, "cameras", 0, "source", "file", "path"), raw) == "machines[0].cameras[0].source.path"


def test_cli_check_exits_non_zero_with_one_line_per_problem(tmp_path: Path) -> None:
    path = write(tmp_path, """
        site: s1
        machines:
          - id: m1
            cameras:
              - {id: c1, models: [a, b, c], fps: -1}
        """)
    result = CliRunner().invoke(app, ["config", "check", str(path)])
    assert result.exit_code == 2
    assert "machines[0].cameras[0].models: at most 2 models per camera (got 3)" in result.output
    assert "machines[0].cameras[0].fps: Input should be greater than 0" in result.output


def test_cli_check_accepts_the_example() -> None:
    result = CliRunner().invoke(app, ["config", "check", str(REPO / "config" / "site.yaml")])
    assert result.exit_code == 0, result.output
    assert "3 machines, 7 cameras, 3 sensor groups" in result.output


def test_missing_trusted_key_file(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, """
        site: s1
        signatures:
          trusted_keys: [keys/plant.pub]
        """)
    assert problems == ["signatures.trusted_keys[0]: file not found: keys/plant.pub"]


def test_outbox_path_must_name_the_machine(tmp_path):
    with pytest.raises(ConfigError) as err:
        from_dict({"site": "s1", "outbox": {"path": "/var/lib/edgeline/outbox.sqlite"}}, base_dir=tmp_path)
    assert "outbox.path" in str(err.value) and "{machine}" in str(err.value)
    site = from_dict({"site": "s1", "outbox": {"path": "data/{machine}.sqlite"}}, base_dir=tmp_path)
    assert site.outbox.path_for("m07", tmp_path) == tmp_path / "data" / "m07.sqlite"


def test_inference_overload_band_must_be_ordered(tmp_path):
    with pytest.raises(ConfigError) as err:
        from_dict({"site": "s1", "inference": {"overload_high": 0.5, "overload_low": 0.7}}, base_dir=tmp_path)
    assert "inference" in str(err.value) and "must be below overload_high" in str(err.value)
