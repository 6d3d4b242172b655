"""Mosquitto credentials and ACL for a site: each machine may publish only under its own topics
and read only its own commands; the site services (MQTT->Kafka bridge, central, embedded rules)
read the whole site and send commands.

The machine's MQTT user name is its machine id, so ``pattern`` lines (``%u``) cover every
machine: it may publish only its own result, anomaly, heartbeat, event and status topics, never a
command, decision or alert (not even under its own id); anything else is refused by the broker
(MQTT 3.1.1 brokers drop such a message silently). The broker ties every client id to its login
(``use_username_as_clientid`` in deploy/mosquitto/mosquitto.conf), so a machine cannot take over
a service's client id and its persistent session either. Every service has its own
user, so one leaked secret is revoked alone. Passwords are hashed by Debian's ``mosquitto_passwd``;
each user's clear password is also written to ``secrets/<user>.pass`` for the process that logs
in as that user (``broker.password_file`` or ``$EDGELINE_MQTT_PASSWORD_FILE``).
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from pathlib import Path

import yaml

from central.settings import CentralSite
from stream.topics import CAMERA_KINDS, MQTT_ROOT

BRIDGE_USER = "edgeline-bridge"
SERVICE_USERS = (BRIDGE_USER, "edgeline-central", "edgeline-rules")
MACHINE_KINDS = ("result", "anomaly", "heartbeat", "event", "status")
"""What a machine publishes under its own id; commands, decisions and alerts come from the services."""


def site_acl(site: CentralSite) -> str:
    """The ``acl_file`` text for ``site``."""
    root = f"{MQTT_ROOT}/{site.site}"
    lines = [
        f"# Mosquitto ACL for site {site.site}, written by `edgeline central broker-auth`.",
        "# Machines log in with their machine id as user name (%u) and publish only their own data.",
        *(f"pattern write {root}/%u/{kind}" for kind in MACHINE_KINDS),
        *(f"pattern write {root}/%u/{kind}/+" for kind in CAMERA_KINDS),
        f"pattern read {root}/%u/cmd/#",
        "",
    ]
    for user in SERVICE_USERS:
        lines += [f"user {user}", f"topic readwrite {root}/#", "topic read $SYS/#", ""]
    return "\n".join(lines)


def site_credentials(site: CentralSite, existing: dict[str, str] | None = None) -> dict[str, str]:
    """A password for every service and machine of the site: ``existing`` ones are kept (so a
    re-run after adding a machine changes no running box's secret), new users get random ones."""
    existing = existing or {}
    users = [*SERVICE_USERS, *(m.id for m in site.machines)]
    return {user: existing.get(user) or secrets.token_urlsafe(18) for user in users}


def write_site_auth(site: CentralSite, out: Path) -> tuple[dict[str, str], list[str]]:
    """Write ``acl``, ``passwd``, ``credentials.yaml`` and ``secrets/<user>.pass`` into ``out``,
    keeping the passwords of a ``credentials.yaml`` already there. Returns the credentials and
    the users that are new."""
    out.mkdir(parents=True, exist_ok=True)
    store = out / "credentials.yaml"
    existing = (yaml.safe_load(store.read_text()) or {}) if store.exists() else {}
    credentials = site_credentials(site, existing)
    write_password_file(out / "passwd", credentials)
    (out / "acl").write_text(site_acl(site))
    _write_secret(store, yaml.safe_dump(credentials))
    (out / "secrets").mkdir(exist_ok=True)
    for user, password in credentials.items():
        _write_secret(out / "secrets" / f"{user}.pass", password + "\n")
    return credentials, [user for user in credentials if user not in existing]


def _write_secret(path: Path, text: str) -> None:
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(text)


def write_password_file(path: Path, credentials: dict[str, str]) -> None:
    """Hash ``credentials`` into a Mosquitto ``password_file`` with ``mosquitto_passwd``."""
    tool = shutil.which("mosquitto_passwd") or ("/usr/bin/mosquitto_passwd"
                                                if Path("/usr/bin/mosquitto_passwd").exists() else None)
    if tool is None:
        raise FileNotFoundError("mosquitto_passwd not found (Debian: apt install mosquitto)")
    _write_secret(path, "")
    for user, password in credentials.items():
        done = subprocess.run([tool, "-b", str(path), user, password], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"mosquitto_passwd failed for {user}: {done.stderr.strip() or done.stdout.strip()}")
