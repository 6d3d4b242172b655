"""Site configuration: valid files load; every bad file names the YAML path of each problem."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from edge.settings import metrics_for, outbox_path
from edgeline.cli import app
from edgeline.config import ConfigError, SiteConfig, from_dict, load, yaml_path
from models.package.synthetic import CHANNELS

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
    (problem,) = problems_of(tmp_path, "site: s1\nmachines: [unclosed\n")
    assert problem.startswith(f"{tmp_path / 'site.yaml'}:3:1: not valid YAML: expected ',' or ']'")
    assert problem.endswith("(while parsing a flow sequence, line 2)") and "<unicode string>" not in problem
    with pytest.raises(ConfigError) as caught:
        load(tmp_path / "absent.yaml")
    assert caught.value.problems[0].startswith("cannot read file")


def test_an_empty_file_says_so(tmp_path: Path) -> None:
    expected = ["(top level): the file is empty; a site file needs at least 'site: <id>'"]
    assert problems_of(tmp_path, "") == expected
    assert problems_of(tmp_path, "# only comments\n") == expected


def test_a_file_that_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_bytes(b"site: s1\n\xff\xfe\n")
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert caught.value.problems == ["not UTF-8 text (byte 9)"]


def test_broker_override_replaces_host_and_port_only(tmp_path: Path) -> None:
    path = write(tmp_path, "site: s1\nbroker: {host: mosquitto, port: 1883, keepalive_s: 20}\n")
    assert (load(path).broker.host, load(path).broker.port) == ("mosquitto", 1883)
    broker = load(path, broker="127.0.0.1:11883").broker
    assert (broker.host, broker.port, broker.keepalive_s) == ("127.0.0.1", 11883, 20)
    assert load(path, broker="[::1]:1884").broker.host == "::1"


@pytest.mark.parametrize(("address", "problem"), [
    ("localhost", "expected host:port (e.g. 127.0.0.1:1883), got 'localhost'"),
    (":1883", "expected host:port (e.g. 127.0.0.1:1883), got ':1883'"),
    ("my broker:1883", "expected host:port (e.g. 127.0.0.1:1883), got 'my broker:1883'"),
    ("host:mqtt", "port must be a number from 1 to 65535 (got 'mqtt' in 'host:mqtt')"),
    ("host:70000", "port must be a number from 1 to 65535 (got '70000' in 'host:70000')"),
    ("::1:1883", "write an IPv6 address in brackets, e.g. [::1]:1883 (got '::1:1883')"),
])
def test_bad_broker_override_is_one_clear_line(tmp_path: Path, address: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, "site: s1\n"), broker=address)
    assert caught.value.problems == [f"--broker / $EDGELINE_BROKER: {problem}"]


def test_each_machine_may_have_its_own_metrics_port(tmp_path: Path) -> None:
    config = from_dict({"site": "s1", "metrics": {"host": "127.0.0.1", "port": 9100},
                        "machines": [{"id": "m1", "metrics_port": 9111}, {"id": "m2"}]})
    mine, where = metrics_for(config, "m1")
    assert (mine.host, mine.port, where) == ("127.0.0.1", 9111, "machines[0].metrics_port")
    assert (metrics_for(config, "m2")[0].port, metrics_for(config, "m2")[1]) == (9100, "metrics.port")
    shared = from_dict({"site": "s1", "machines": [{"id": "m1"}, {"id": "m2"}, {"id": "m3", "metrics_port": 0},
                                                   {"id": "m4", "metrics_port": 0}]})
    assert [metrics_for(shared, m)[0].port for m in ("m1", "m2", "m3", "m4")] == [9100, 9100, 0, 0]  # many boxes


def test_two_machines_with_the_same_own_metrics_port_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        from_dict({"site": "s1", "machines": [{"id": "m1", "metrics_port": 9111}, {"id": "m2", "metrics_port": 9112},
                                              {"id": "m3", "metrics_port": 9111}]})
    assert caught.value.problems == [
        "machines[2].metrics_port: 9111 is also machines[0].metrics_port (each agent on a box needs its own port)"]


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
    assert outbox_path(site.outbox, "m07", tmp_path) == tmp_path / "data" / "m07.sqlite"


def test_inference_overload_band_must_be_ordered(tmp_path):
    with pytest.raises(ConfigError) as err:
        from_dict({"site": "s1", "inference": {"overload_high": 0.5, "overload_low": 0.7}}, base_dir=tmp_path)
    assert "inference" in str(err.value) and "must be below overload_high" in str(err.value)


def test_one_box_site_is_the_example_site_on_this_box() -> None:
    one_box, example = load(REPO / "config" / "one-box.yaml"), load(REPO / "config" / "site.yaml")
    assert (one_box.broker.host, one_box.broker.port, one_box.metrics.host) == ("127.0.0.1", 1883, "127.0.0.1")
    ports = [metrics_for(one_box, m.id)[0].port for m in one_box.machines]
    assert len(set(ports)) == len(ports) and not set(ports) & {9102, 9103, 9104}  # bridge, worker, rules
    kept = {"broker", "outbox", "evidence", "metrics", "stream", "machines", "packages"}
    assert one_box.model_dump(exclude=kept) == example.model_dump(exclude=kept)
    assert [m.model_dump(exclude={"metrics_port"}) for m in one_box.machines] == [
        m.model_dump(exclude={"metrics_port"}) for m in example.machines]
    assert one_box.packages.download_urls == ["http://127.0.0.1:8080/models/"]  # central, as each file reaches it
    assert example.packages.download_urls == ["http://central:8080/models/"]


def test_one_box_outboxes_are_relative_to_the_site_file() -> None:
    path = REPO / "config" / "one-box.yaml"
    outbox = outbox_path(load(path).outbox, "m01", path.parent)
    assert outbox == REPO / "config" / "var" / "outbox-m01.sqlite"


def test_cli_check_accepts_the_one_box_site() -> None:
    result = CliRunner().invoke(app, ["config", "check", str(REPO / "config" / "one-box.yaml")])
    assert result.exit_code == 0, result.output
    assert "3 machines, 7 cameras, 3 sensor groups" in result.output


@pytest.mark.parametrize("command", [["edge", "run", "--machine", "m01"], ["stream", "embedded"],
                                     ["stream", "bridge"], ["central", "serve"]])
def test_a_bad_broker_address_exits_2_with_one_line(command: list[str]) -> None:
    site = str(REPO / "config" / "one-box.yaml")
    by_option = CliRunner().invoke(app, [*command, "--config", site, "--broker", "mosquitto"])
    by_env = CliRunner().invoke(app, [*command, "--config", site], env={"EDGELINE_BROKER": "127.0.0.1:0"})
    assert by_option.exit_code == 2, by_option.output
    assert "--broker / $EDGELINE_BROKER: expected host:port (e.g. 127.0.0.1:1883), got 'mosquitto'" in by_option.output
    assert by_env.exit_code == 2, by_env.output
    assert "port must be a number from 1 to 65535 (got '0' in '127.0.0.1:0')" in by_env.output


def test_edge_run_with_an_outbox_it_cannot_open_exits_2_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where the outbox folder should be")
    path = write(tmp_path, """
        site: s1
        outbox: {path: "blocker/outbox-{machine}.sqlite"}
        machines: [{id: m1}]
        """)
    result = CliRunner().invoke(app, ["edge", "run", "-c", str(path), "--machine", "m1"])
    assert result.exit_code == 2, result.output
    assert f"edge:m1: outbox.path: cannot open {tmp_path / 'blocker' / 'outbox-m1.sqlite'}: " in result.output
    assert "relative paths are relative to the site file" in result.output


# ---------------------------------------------------------------- sensor channels

SKAB = list(CHANNELS)


def manifest_only(tmp_path: Path, channels: list[str], name: str = "press") -> Path:
    """A package folder holding only its manifest: all that config check reads (no ONNX)."""
    from models.package import write_manifest
    from tests.tiny_anomaly import tiny_manifest

    folder = tmp_path / name
    folder.mkdir()
    write_manifest(folder, tiny_manifest(channels, name=name))
    return folder


def sensor_site(tmp_path: Path, sensors: list[dict], models: dict | None = None) -> dict:
    return {"site": "s1", "models": models or {"anomaly": {"path": "builtin:anomaly-skab"}},
            "machines": [{"id": "m1", "sensors": sensors}]}


def sensor_problems(tmp_path: Path, sensors: list[dict], models: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        from_dict(sensor_site(tmp_path, sensors, models), base_dir=tmp_path)
    return caught.value.problems


def test_sensor_channels_default_to_the_packages(tmp_path: Path) -> None:
    config = from_dict(sensor_site(tmp_path, [{"id": "p1", "model": "anomaly"}, {"id": "p2"}]), base_dir=tmp_path)
    with_model, synthetic = config.machines[0].sensors
    assert [c.name for c in with_model.channels] == SKAB
    assert [(c.column, c.field, c.min, c.max) for c in with_model.channels][2] == ("Current", "Current", None, None)
    assert [c.name for c in synthetic.channels] == SKAB  # no model: the synthetic pump's


def test_declared_channels_in_any_order_with_columns_fields_units_and_ranges(tmp_path: Path) -> None:
    declared = [{"name": "Temperature", "unit": "degC", "min": -20, "max": 200, "field": "temp_c"},
                *[name for name in reversed(SKAB) if name != "Temperature"]]
    config = from_dict(sensor_site(tmp_path, [{"id": "p1", "model": "anomaly", "channels": declared}]),
                       base_dir=tmp_path)
    channels = config.machines[0].sensors[0].channels
    assert channels[0].model_dump() == {"name": "Temperature", "column": "Temperature", "field": "temp_c",
                                        "unit": "degC", "min": -20.0, "max": 200.0}
    assert [c.name for c in channels[1:]] == [n for n in reversed(SKAB) if n != "Temperature"]


def test_channels_that_differ_from_the_package_are_refused_naming_the_yaml_path(tmp_path: Path) -> None:
    problems = sensor_problems(tmp_path, [
        {"id": "p0", "model": "anomaly"},
        {"id": "p1", "model": "anomaly", "channels": ["Current", "Pressure", "Flow"],
         "source": {"type": "mqtt", "topic": "t"}},
    ])
    assert problems == [
        "machines[0].sensors[1].channels: [Current, Pressure, Flow] differ from the channels of model 'anomaly': "
        f"[{', '.join(SKAB)}] (missing Accelerometer1RMS, Accelerometer2RMS, Temperature, Thermocouple, Voltage, "
        "VolumeFlowRateRMS; not in the model Flow)"]


def test_cli_check_prints_the_channel_mismatch_and_exits_non_zero(tmp_path: Path) -> None:
    path = write(tmp_path, """
        site: s1
        models:
          anomaly: {path: "builtin:anomaly-skab"}
        machines:
          - id: m1
            sensors:
              - {id: p1, model: anomaly, channels: [Current]}
        """)
    result = CliRunner().invoke(app, ["config", "check", str(path)])
    assert result.exit_code != 0
    assert "machines[0].sensors[0].channels: [Current] differ from the channels of model 'anomaly'" in result.output


@pytest.mark.parametrize("count", [1, 64])
def test_one_to_64_channels(tmp_path: Path, count: int) -> None:
    names = ["value"] if count == 1 else [f"vib{i:02d}" for i in range(count)]
    models = {"press": {"path": str(manifest_only(tmp_path, names))}}
    config = from_dict(sensor_site(tmp_path, [{"id": "g", "model": "press", "source": {"type": "mqtt", "topic": "t"}},
                                              {"id": "h", "model": "press", "channels": names[::-1],
                                               "source": {"type": "mqtt", "topic": "u"}}], models),
                       base_dir=tmp_path)
    assert [len(s.channels) for s in config.machines[0].sensors] == [count, count]
    assert config.machines[0].sensors[0].channels[-1].field == names[-1]


def test_channel_list_bounds_ranges_and_names_are_checked(tmp_path: Path) -> None:
    problems = sensor_problems(tmp_path, [
        {"id": "a", "channels": []},
        {"id": "b", "channels": [f"c{i}" for i in range(65)]},
        {"id": "c", "channels": [{"name": "Current", "min": 5, "max": 1}]},
        {"id": "d", "channels": ["Current", "Current"]},
        {"id": "e", "channels": ["has space"]},
    ])
    assert problems[0] == "machines[0].sensors[0].channels: List should have at least 1 item after validation, not 0"
    assert problems[1] == "machines[0].sensors[1].channels: List should have at most 64 items after validation, not 65"
    assert problems[2] == "machines[0].sensors[2].channels[0]: min (5) is above max (1)"
    assert problems[3] == "machines[0].sensors[3].channels: channel listed twice: Current"
    assert problems[4].startswith("machines[0].sensors[4].channels[0].name: String should match pattern")
    assert len(problems) == 5


def test_sources_are_checked_against_the_channels(tmp_path: Path) -> None:
    (tmp_path / "press.csv").write_text("timestamp,load,pressure\n2024-01-01 00:00:00,1,2\n")
    models = {"press": {"path": str(manifest_only(tmp_path, ["load", "pressure", "motor_temp"]))},
              "seg": {"path": "builtin:seg-synth-int8"}}
    problems = sensor_problems(tmp_path, [
        {"id": "a", "model": "press", "source": {"type": "csv", "path": "press.csv"}},
        {"id": "b", "model": "press", "source": {"type": "csv", "path": "press.csv", "time_column": "clock"},
         "channels": ["load", "pressure", {"name": "motor_temp", "column": "temp"}]},
        {"id": "c", "model": "press"},  # synthetic pump: it has none of these
        {"id": "d", "source": {"type": "mqtt", "topic": "t"}},  # no model, nothing declared
        {"id": "e", "model": "seg"},
    ], models)
    assert problems == [
        "machines[0].sensors[0].source.path: press.csv has no column [motor_temp] (its columns: [load, pressure, "
        "timestamp])",
        "machines[0].sensors[1].source.path: press.csv has no column [temp, clock] (its columns: [load, pressure, "
        "timestamp])",
        "machines[0].sensors[2].channels: the synthetic pump has no [load, motor_temp, pressure] (it has "
        f"[{', '.join(SKAB)}])",
        "machines[0].sensors[3].channels: declare the group's channels (it has no model to take them from)",
        "machines[0].sensors[4].model: model 'seg' is a segmentation model, a sensor group needs an anomaly model",
    ]


def test_csv_source_by_column_name_with_its_own_separator(tmp_path: Path) -> None:
    (tmp_path / "pump.csv").write_text("datetime;Volume Flow RateRMS;Current\n2020-03-09 10:14:33;32.0;1.3\n")
    models = {"pump": {"path": str(manifest_only(tmp_path, ["flow", "Current"]))}}
    config = from_dict(sensor_site(tmp_path, [
        {"id": "a", "model": "pump", "source": {"type": "csv", "path": "pump.csv", "separator": ";"},
         "channels": [{"name": "flow", "column": "VolumeFlowRateRMS"}, "Current"]}], models), base_dir=tmp_path)
    assert config.machines[0].sensors[0].channels[0].column == "VolumeFlowRateRMS"


def test_channels_are_read_from_a_package_tar_without_extracting(tmp_path: Path) -> None:
    import tarfile

    folder = manifest_only(tmp_path, ["a", "b", "c"])
    with tarfile.open(tmp_path / "press.tar", "w") as tar:
        tar.add(folder / "manifest.json", arcname="manifest.json")
    models = {"press": {"path": "press.tar"}}
    problems = sensor_problems(tmp_path, [{"id": "g", "model": "press", "channels": ["a", "b"],
                                           "source": {"type": "mqtt", "topic": "t"}}], models)
    assert problems == ["machines[0].sensors[0].channels: [a, b] differ from the channels of model 'press': [a, b, c] "
                        "(missing c)"]


def test_the_mqtt_source_has_no_fixed_field_list_any_more(tmp_path: Path) -> None:
    problems = sensor_problems(tmp_path, [{"id": "p", "model": "anomaly",
                                           "source": {"type": "mqtt", "topic": "t", "fields": SKAB}}])
    assert problems == ["machines[0].sensors[0].source.fields: unknown field"]


def test_every_setting_of_the_site_tree_says_what_it_is() -> None:
    """Every field of every settings model under :class:`SiteConfig` has a description."""
    seen: set[type[BaseModel]] = set()
    missing = []

    def models_in(annotation: Any) -> Iterator[type[BaseModel]]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield annotation
        for arg in get_args(annotation):
            yield from models_in(arg)

    def walk(model: type[BaseModel]) -> None:
        seen.add(model)
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(f"{model.__module__}.{model.__name__}.{name}")
            for inner in models_in(field.annotation):
                if inner not in seen:
                    walk(inner)

    walk(SiteConfig)
    assert missing == [] and len(seen) > 30
