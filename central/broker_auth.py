"""Mosquitto credentials and ACL for a site: each machine may publish only under its own topics
and read only its own commands; the bridge reads the whole site and publishes commands.

The machine's MQTT user name is its machine id, so one ``pattern`` line (``%u``) covers every
machine; an agent that tries to publish as another machine is refused by the broker (MQTT 3.1.1
brokers drop such a message silently), whatever its client id says. Passwords are hashed by
Debian's ``mosquitto_passwd``.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from pathlib import Path

from edgeline.config import SiteConfig
from stream.topics import MQTT_ROOT

BRIDGE_USER = "edgeline-bridge"


def site_acl(site: SiteConfig, bridge_user: str = BRIDGE_USER) -> str:
    """The ``acl_file`` text for ``site``."""
    root = f"{MQTT_ROOT}/{site.site}"
    return "\n".join([
        f"# Mosquitto ACL for site {site.site}, written by `edgeline central broker-auth`.",
        "# Machines log in with their machine id as user name (%u).",
        f"pattern write {root}/%u/#",
        f"pattern read {root}/%u/cmd/#",
        "",
        f"user {bridge_user}",
        f"topic readwrite {root}/#",
        "",
    ])


def new_credentials(site: SiteConfig, bridge_user: str = BRIDGE_USER) -> dict[str, str]:
    """A fresh random password for the bridge and for every machine of the site."""
    return {user: secrets.token_urlsafe(18) for user in [bridge_user, *(m.id for m in site.machines)]}


def write_password_file(path: Path, credentials: dict[str, str]) -> None:
    """Hash ``credentials`` into a Mosquitto ``password_file`` with ``mosquitto_passwd``."""
    tool = shutil.which("mosquitto_passwd") or ("/usr/bin/mosquitto_passwd"
                                                if Path("/usr/bin/mosquitto_passwd").exists() else None)
    if tool is None:
        raise FileNotFoundError("mosquitto_passwd not found (Debian: apt install mosquitto)")
    path.write_text("")
    path.chmod(0o600)
    for user, password in credentials.items():
        done = subprocess.run([tool, "-b", str(path), user, password], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"mosquitto_passwd failed for {user}: {done.stderr.strip() or done.stdout.strip()}")
