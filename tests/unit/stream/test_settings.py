"""The stream's slice of the site file, and the one place that reads broker secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from stream.settings import BrokerConfig, ConfigError, StreamSite, TlsConfig, mqtt_settings


def test_a_stream_site_validates_alone_and_knows_each_machines_line() -> None:
    site = StreamSite.model_validate({"site": "s1", "machines": [{"id": "m1", "line": "l2"}, {"id": "m2"}],
                                      "rules": [{"name": "r", "metric": "defect_ratio", "condition": {"value": 0.5}}]})
    assert site.lines() == {"m1": "l2", "m2": "line-1"}
    assert [rule.name for rule in site.rules] == ["r"]
    assert site.stream.topics().for_kind("result") == "edgeline.results"


def test_a_stream_site_refuses_what_only_the_edge_reads() -> None:
    with pytest.raises(ValidationError) as err:
        StreamSite.model_validate({"site": "s1", "machines": [{"id": "m1", "cameras": []}], "outbox": {}})
    assert {(e["loc"], e["type"]) for e in err.value.errors()} == {
        (("machines", 0, "cameras"), "extra_forbidden"), (("outbox",), "extra_forbidden")}


def test_mqtt_settings_fill_the_machine_into_user_name_and_password_file(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "m07.pass").write_text("s3cret\n")
    broker = BrokerConfig(host="broker.local", port=8883, username="{machine}", password_file="secrets/{machine}.pass",
                          tls=TlsConfig(ca_file=Path("ca.pem")), keepalive_s=20, reconnect_max_s=9)
    settings = mqtt_settings(broker, "m07", tmp_path, environ={})
    assert (settings.host, settings.port, settings.username, settings.password) == ("broker.local", 8883, "m07", "s3cret")
    assert (settings.ca_file, settings.cert_file, settings.keepalive_s, settings.reconnect_max_s) == ("ca.pem", None, 20, 9)


def test_the_environment_overrides_the_file_and_the_password_file_the_password(tmp_path: Path) -> None:
    broker = BrokerConfig(username="from-file", password="plain")
    assert (mqtt_settings(broker, environ={}).username, mqtt_settings(broker, environ={}).password) == ("from-file",
                                                                                                        "plain")
    (tmp_path / "central.pass").write_text("from-secret\n")
    environ = {"EDGELINE_MQTT_USERNAME": "edgeline-central", "EDGELINE_MQTT_PASSWORD_FILE": str(tmp_path / "central.pass")}
    settings = mqtt_settings(broker, environ=environ)
    assert (settings.username, settings.password) == ("edgeline-central", "from-secret")
    settings = mqtt_settings(broker, environ={**environ, "EDGELINE_MQTT_PASSWORD": "from-env"})
    assert settings.password == "from-env"


def test_an_unreadable_secret_names_where_its_path_came_from(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"broker\.password_file: cannot read .*m1\.pass"):
        mqtt_settings(BrokerConfig(password_file="{machine}.pass"), "m1", tmp_path, environ={})
    with pytest.raises(ConfigError, match=r"\$EDGELINE_MQTT_PASSWORD_FILE: cannot read"):
        mqtt_settings(BrokerConfig(), environ={"EDGELINE_MQTT_PASSWORD_FILE": str(tmp_path / "missing")})
