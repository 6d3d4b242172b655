"""The fleet and model registries in SQL (SQLite by default, PostgreSQL by URL, via SQLAlchemy).

Model packages are stored as the uploaded tar under ``storage/`` and indexed by
``<name>-<version>-<precision>``; an upload is verified before it is kept (extraction limits,
every file's sha256, the Ed25519 signature against the trusted keys, and ``model.onnx`` loaded in
ONNX Runtime with the inputs and outputs the manifest names), so the registry never serves a
package the edge would refuse.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Float, String, Text, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from models.package import PackageError, PackageSettings, check_model_graph, load_package, manifest_json


class Base(DeclarativeBase):
    pass


class MachineRow(Base):
    __tablename__ = "machines"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    site: Mapped[str] = mapped_column(String(64))
    line: Mapped[str] = mapped_column(String(64), default="")
    cameras: Mapped[str] = mapped_column(Text, default="[]")
    """JSON list of camera ids."""
    models: Mapped[str] = mapped_column(Text, default="{}")
    """JSON: model name -> package id assigned to the machine."""
    status: Mapped[str] = mapped_column(String(16), default="unknown")
    last_heartbeat: Mapped[float] = mapped_column(Float, default=0.0)


class PackageRow(Base):
    __tablename__ = "packages"
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    precision: Mapped[str] = mapped_column(String(8))
    task: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str] = mapped_column(String(64))
    manifest: Mapped[str] = mapped_column(Text)
    uploaded_at: Mapped[float] = mapped_column(Float)


class RolloutRow(Base):
    __tablename__ = "rollouts"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(Text)
    """JSON of :func:`central.rollout_machine.rollout_to_dict`: plan, phase, history, health seen."""
    updated_at: Mapped[float] = mapped_column(Float)


class RegistryError(ValueError):
    """A request the registry refuses; ``status`` is the HTTP status it maps to."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class StoredPackage:
    id: str
    name: str
    version: str
    precision: str
    task: str
    sha256: str
    key_id: str
    manifest: dict
    uploaded_at: float


def engine_url(url: str) -> str:
    """``postgresql://...`` means psycopg 3 (the driver the central extra installs)."""
    return "postgresql+psycopg://" + url.removeprefix("postgresql://") if url.startswith("postgresql://") else url


class Registry:
    def __init__(self, url: str, storage: Path, trusted_keys: list[Ed25519PublicKey],
                 limits: PackageSettings | None = None) -> None:
        self.limits = limits or PackageSettings()
        self.engine = create_engine(engine_url(url))
        Base.metadata.create_all(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.storage = storage
        self.storage.mkdir(parents=True, exist_ok=True)
        self.trusted_keys = trusted_keys

    # ------------------------------------------------------------ packages

    def add_package(self, tar_bytes: bytes) -> StoredPackage:
        """Verify and keep an uploaded package tar; refuse oversized, unsigned, tampered, unloadable
        (``model.onnx`` not matching its manifest) or duplicate ones."""
        digest = hashlib.sha256(tar_bytes).hexdigest()
        with tempfile.TemporaryDirectory(prefix="edgeline-upload-") as tmp:
            tar = Path(tmp) / "package.tar"
            tar.write_bytes(tar_bytes)
            try:
                package = load_package(tar, trusted_keys=self.trusted_keys, cache_dir=Path(tmp) / "x",
                                       limits=self.limits)
                check_model_graph(package)
            except PackageError as exc:
                raise RegistryError(400, f"package refused: {exc}") from None
            manifest = package.manifest
            package_id = manifest.package_id
            with self.sessions() as session:
                if session.get(PackageRow, package_id) is not None:
                    raise RegistryError(409, f"package {package_id} is already registered")
                row = PackageRow(id=package_id, name=manifest.name, version=manifest.version,
                                 precision=manifest.precision, task=manifest.task, sha256=digest,
                                 key_id=manifest.signature.key_id if manifest.signature else "",
                                 manifest=json.dumps(manifest_json(manifest)), uploaded_at=time.time())
                shutil.copyfile(tar, self.package_path(package_id))
                session.add(row)
                session.commit()
        return _stored(row)

    def packages(self) -> list[StoredPackage]:
        with self.sessions() as session:
            return [_stored(r) for r in session.scalars(select(PackageRow).order_by(PackageRow.id))]

    def package(self, package_id: str) -> StoredPackage:
        with self.sessions() as session:
            row = session.get(PackageRow, package_id)
        if row is None:
            raise RegistryError(404, f"no package {package_id!r}")
        return _stored(row)

    def package_path(self, package_id: str) -> Path:
        return self.storage / f"{package_id}.tar"

    # ------------------------------------------------------------ rollouts

    def save_rollout(self, rollout_id: str, model: str, state: dict) -> None:
        with self.sessions() as session:
            session.merge(RolloutRow(id=rollout_id, model=model, state=json.dumps(state), updated_at=time.time()))
            session.commit()

    def rollouts(self) -> list[tuple[str, str, dict]]:
        """(id, model, state) of every rollout, oldest first."""
        with self.sessions() as session:
            rows = session.scalars(select(RolloutRow).order_by(RolloutRow.updated_at))
            return [(r.id, r.model, json.loads(r.state)) for r in rows]

    # ------------------------------------------------------------ machines

    def upsert_machine(self, machine_id: str, site: str, line: str = "", cameras: list[str] | None = None,
                       models: dict[str, str] | None = None) -> MachineRow:
        with self.sessions() as session:
            row = session.get(MachineRow, machine_id) or MachineRow(id=machine_id)
            row.site, row.line = site, line
            row.cameras = json.dumps(cameras or [])
            row.models = json.dumps(models or {})
            session.merge(row)
            session.commit()
        return self.machine(machine_id)

    def sync_site(self, site: str, machines: dict[str, tuple[str, list[str]]]) -> None:
        """Register the site file's machines {id: (line, cameras)}; their status, models and last
        heartbeat stay as the machines reported them."""
        with self.sessions() as session:
            for machine_id, (line, cameras) in machines.items():
                row = session.get(MachineRow, machine_id) or MachineRow(id=machine_id)
                row.site, row.line, row.cameras = site, line, json.dumps(cameras)
                session.merge(row)
            session.commit()

    def record_heartbeat(self, machine_id: str, site: str, ts: float, models: dict[str, str],
                         cameras: list[str], register_unknown: bool = False) -> bool:
        """A heartbeat: the machine is online, has ``cameras`` and runs ``models``. A machine the
        registry does not know is registered only with ``register_unknown``; False when it was not."""
        with self.sessions() as session:
            row = session.get(MachineRow, machine_id)
            if row is None and not register_unknown:
                return False
            row = row or MachineRow(id=machine_id, site=site, line="")
            row.status, row.last_heartbeat = "online", ts
            row.models, row.cameras = json.dumps(models), json.dumps(cameras)
            session.merge(row)
            session.commit()
        return True

    def set_status(self, machine_id: str, status: str) -> None:
        with self.sessions() as session:
            row = session.get(MachineRow, machine_id)
            if row is not None:
                row.status = status
                session.commit()

    def machines(self) -> list[MachineRow]:
        with self.sessions() as session:
            return list(session.scalars(select(MachineRow).order_by(MachineRow.id)))

    def machine(self, machine_id: str) -> MachineRow:
        with self.sessions() as session:
            row = session.get(MachineRow, machine_id)
        if row is None:
            raise RegistryError(404, f"no machine {machine_id!r}")
        return row

    def machines_on(self, line: str) -> list[str]:
        """The ids of the machines on ``line``."""
        with self.sessions() as session:
            return list(session.scalars(select(MachineRow.id).where(MachineRow.line == line).order_by(MachineRow.id)))

    def line_of(self, machine_id: str) -> str:
        """The machine's line ('' for a machine on none, or not in the fleet)."""
        with self.sessions() as session:
            row = session.get(MachineRow, machine_id)
        return row.line if row is not None else ""


def _stored(row: PackageRow) -> StoredPackage:
    return StoredPackage(row.id, row.name, row.version, row.precision, row.task, row.sha256, row.key_id,
                         json.loads(row.manifest), row.uploaded_at)
