"""Central's settings: :class:`CentralSite`, the slice of the site file the control plane reads
(the machines it issues broker logins to, the package limits and who may sign packages)."""

from __future__ import annotations

from pydantic import Field

from models.package import PackageSettings, SignatureConfig
from stream.settings import StreamSite


class CentralSite(StreamSite):
    """What central (registry, rollouts, broker credentials) reads from the site file."""

    signatures: SignatureConfig = Field(default_factory=SignatureConfig, description="who may sign model packages")
    packages: PackageSettings = Field(default_factory=PackageSettings, description="package tar limits (central "
                                      "and edge) and the URLs the edge downloads packages from")
