"""Central's slice of the site file: it validates alone, and broker credentials come from it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from central.broker_auth import SERVICE_USERS, site_acl, site_credentials
from central.settings import CentralSite


def test_a_central_site_validates_alone_and_gives_every_machine_a_login() -> None:
    site = CentralSite.model_validate({"site": "plant", "machines": [{"id": "m1"}, {"id": "m2", "line": "l2"}],
                                       "signatures": {"require": False}, "packages": {"max_files": 8}})
    assert (site.signatures.require, site.packages.max_files) == (False, 8)
    assert set(site_credentials(site)) == {*SERVICE_USERS, "m1", "m2"}
    assert "pattern write edgeline/v1/plant/%u/result" in site_acl(site).splitlines()


def test_a_central_site_refuses_the_edges_settings() -> None:
    with pytest.raises(ValidationError) as err:
        CentralSite.model_validate({"site": "plant", "camera_defaults": {"fps": 5}})
    assert [(e["loc"], e["type"]) for e in err.value.errors()] == [(("camera_defaults",), "extra_forbidden")]
