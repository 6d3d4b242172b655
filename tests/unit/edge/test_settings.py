"""The edge's slice of the site file: cameras are complete after validation, the helpers are pure."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
from pydantic import ValidationError

from edge.settings import (BUILTIN_PREFIX, CameraConfig, CameraDefaults, EdgeSite, ModelRef, OutboxConfig,
                           machine_config, outbox_path, resolve_model_path)
from edgeline.config import from_dict
from models.package import BUILTIN_PACKAGES

SITE = {"site": "s1", "camera_defaults": {"fps": 12, "resolution": [640, 480], "queue_size": 3, "gate_threshold": 4},
        "machines": [{"id": "m1", "cameras": [{"id": "c1"}, {"id": "c2", "fps": 3, "gate_threshold": 0}]}]}


def test_an_edge_site_validates_alone_and_fills_camera_defaults_into_every_camera() -> None:
    site = EdgeSite.model_validate(SITE)
    c1, c2 = machine_config(site, "m1").cameras
    assert (c1.fps, c1.resolution, c1.queue_size, c1.gate_threshold) == (12.0, (640, 480), 3, 4.0)
    assert (c2.fps, c2.resolution, c2.queue_size, c2.gate_threshold) == (3.0, (640, 480), 3, 0.0)


@pytest.mark.parametrize("load", [EdgeSite.model_validate, from_dict])
def test_a_loaded_cameras_settings_are_complete_plain_values(load) -> None:
    camera = load(SITE).machines[0].cameras[0]
    assert isinstance(camera, CameraConfig)
    for name, field in CameraDefaults.model_fields.items():
        assert field.annotation is CameraConfig.model_fields[name].annotation  # typed alike: never Optional
        assert type(None) not in get_args(field.annotation) and getattr(camera, name) is not None
    assert (type(camera.fps), type(camera.queue_size), type(camera.gate_threshold)) == (float, int, float)


def test_without_camera_defaults_a_camera_gets_the_built_in_ones() -> None:
    camera = EdgeSite.model_validate({"site": "s1", "machines": [{"id": "m1", "cameras": [{"id": "c1"}]}]}) \
        .machines[0].cameras[0]
    assert camera.model_dump(include=set(CameraDefaults.model_fields)) == CameraDefaults().model_dump()


def test_a_bad_camera_value_is_refused_at_its_own_path() -> None:
    bad = {**SITE, "machines": [{"id": "m1", "cameras": [{"id": "c1", "queue_size": 0}]}]}
    with pytest.raises(ValidationError) as err:
        EdgeSite.model_validate(bad)
    assert [e["loc"] for e in err.value.errors()] == [("machines", 0, "cameras", 0, "queue_size")]


def test_machine_config_names_the_missing_machine() -> None:
    with pytest.raises(KeyError, match="no machine 'm9' in site 's1'"):
        machine_config(EdgeSite.model_validate(SITE), "m9")


def test_outbox_and_model_paths_resolve_against_the_site_folder(tmp_path: Path) -> None:
    assert outbox_path(OutboxConfig(path="var/{machine}.sqlite"), "m1", tmp_path) == tmp_path / "var" / "m1.sqlite"
    assert outbox_path(OutboxConfig(path="/abs/{machine}.sqlite"), "m1", tmp_path) == Path("/abs/m1.sqlite")
    assert resolve_model_path(ModelRef(path=f"{BUILTIN_PREFIX}seg-synth-int8"), tmp_path) == \
        BUILTIN_PACKAGES / "seg-synth-int8"
    assert resolve_model_path(ModelRef(path="pkgs/seg"), tmp_path) == (tmp_path / "pkgs" / "seg").resolve()
