"""The site configuration: every package's settings composed into one tree, loaded from YAML by
:func:`load`.

Each package owns its settings (``stream.settings``, ``edge.settings``, ``central.settings``, the
model contract's package and signature settings); :class:`SiteConfig` is all of them at once, so
the YAML is one file. Errors name the YAML path of each problem (``machines[1].cameras[0].models:
at most 2 models per camera``). The checks that span packages (a sensor group's channels against
its model package, files that must exist) run after validation.
"""

from __future__ import annotations

import csv
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from central.settings import CentralSite
from edge.settings import (CsvSensorSource, EdgeSite, FileSource, MachineConfig, SensorChannel, SensorGroupConfig,
                           SyntheticSensorSource, resolve_model_path)
from models.package import MANIFEST_FILE, AnomalyPreprocess, Manifest, PackageError, is_package_tar, read_manifest
from models.package.series import column_key, sniff_separator
from models.package.synthetic import CHANNELS as PUMP_CHANNELS
from stream.messages import IDENTIFIER_PATTERN
from stream.settings import ConfigError


class SiteConfig(EdgeSite, CentralSite):
    """The whole site file: the edge's, central's and the stream's settings in one tree."""


# ---------------------------------------------------------------- loading


def load(path: str | Path, broker: str | None = None) -> SiteConfig:
    """Read, validate and cross-check a site YAML file; raise :class:`ConfigError` on any problem.

    ``broker`` (``host:port``, from ``--broker`` or ``$EDGELINE_BROKER``) replaces the file's
    ``broker.host`` and ``broker.port``.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), [f"not UTF-8 text (byte {exc.start})"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [_yaml_problem(path, exc)]) from None
    if raw is None:
        raise ConfigError(str(path), ["(top level): the file is empty; a site file needs at least 'site: <id>'"])
    config = from_dict(raw, base_dir=path.parent, source=str(path))
    return config if broker is None else with_broker(config, broker)


def _yaml_problem(path: Path, exc: yaml.YAMLError) -> str:
    """``site.yaml:3:7: not valid YAML: <problem> (<context>, line 2)``: the file and line, not PyYAML's
    ``"<unicode string>"``."""
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return f"{path}: not valid YAML: {exc}".replace("<unicode string>", str(path)).replace("\n", " ")
    text = f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {getattr(exc, 'problem', None) or exc}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        text += f" ({context}, line {context_mark.line + 1})"
    elif context:
        text += f" ({context})"
    return text


BROKER_OVERRIDE = "--broker / $EDGELINE_BROKER"
HOST_NAME = re.compile(r"[A-Za-z0-9._:%-]+")


def with_broker(config: SiteConfig, address: str, source: str = BROKER_OVERRIDE) -> SiteConfig:
    """``config`` with its broker host and port replaced by ``address`` (``host:port``)."""
    try:
        host, port = parse_host_port(address)
    except ValueError as exc:
        raise ConfigError(source, [f"{source}: {exc}"]) from None
    return config.model_copy(update={"broker": config.broker.model_copy(update={"host": host, "port": port})})


def parse_host_port(address: str) -> tuple[str, int]:
    """``host:port`` or ``[ipv6]:port`` -> (host, port); ValueError saying what is wrong."""
    host, sep, port = address.strip().rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if not sep or not HOST_NAME.fullmatch(host):
        raise ValueError(f"expected host:port (e.g. 127.0.0.1:1883), got {address!r}")
    if ":" in host and not bracketed:
        raise ValueError(f"write an IPv6 address in brackets, e.g. [::1]:1883 (got {address!r})")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"port must be a number from 1 to 65535 (got {port!r} in {address!r})")
    return host, int(port)


def from_dict(raw: Any, base_dir: Path = Path("."), source: str = "<config>") -> SiteConfig:
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"(top level): expected a mapping, got {type(raw).__name__}"])
    try:
        config = SiteConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(source, [_describe(error, raw) for error in exc.errors(include_url=False)]) from None
    problems = _cross_check(config, base_dir)
    if problems:
        raise ConfigError(source, problems)
    return config


def _cross_check(config: SiteConfig, base_dir: Path) -> list[str]:
    """Checks that span the tree: unique ids, model names that exist, files that exist."""
    problems: list[str] = []
    for name, ref in config.models.items():
        package = resolve_model_path(ref, base_dir)
        if not (package / "manifest.json").is_file() and not (is_package_tar(package) and package.is_file()):
            problems.append(f"models.{name}.path: no model package (folder with manifest.json, or .tar) at {package}")
    for index, key in enumerate(config.signatures.trusted_keys):
        if not (base_dir / key).is_file():
            problems.append(f"signatures.trusted_keys[{index}]: file not found: {key}")
    problems += _duplicates("machines", [m.id for m in config.machines], "machine id")
    problems += _duplicates("rules", [r.name for r in config.rules], "rule name")
    problems += _shared_metrics_ports(config.machines)
    packages = _package_channels(config, base_dir)
    for i, machine in enumerate(config.machines):
        where = f"machines[{i}]"
        problems += _duplicates(f"{where}.cameras", [c.id for c in machine.cameras], "camera id")
        problems += _duplicates(f"{where}.sensors", [s.id for s in machine.sensors], "sensor group id")
        for j, camera in enumerate(machine.cameras):
            for k, model in enumerate(camera.models):
                if model not in config.models:
                    problems.append(f"{where}.cameras[{j}].models[{k}]: unknown model {model!r}{_known(config)}")
            if isinstance(camera.source, FileSource) and not (base_dir / camera.source.path).exists():
                problems.append(f"{where}.cameras[{j}].source.path: file not found: {camera.source.path}")
        for j, sensor in enumerate(machine.sensors):
            problems += _sensor_problems(f"{where}.sensors[{j}]", sensor, config, base_dir, packages)
    return problems


def _sensor_problems(where: str, sensor: SensorGroupConfig, config: SiteConfig, base_dir: Path,
                     packages: dict[str, list[str] | str]) -> list[str]:
    """Resolves the group's channels (declared, else its package's, else the pump's) and checks them
    against its model package, its source's CSV header and the synthetic pump."""
    if sensor.model is not None and sensor.model not in config.models:
        return [f"{where}.model: unknown model {sensor.model!r}{_known(config)}"]
    expected = packages.get(sensor.model) if sensor.model else None
    if isinstance(expected, str):
        return [f"{where}.model: {expected}"]
    if sensor.channels is None and (expected or isinstance(sensor.source, SyntheticSensorSource)):
        sensor.channels = [SensorChannel(name=name) for name in expected or PUMP_CHANNELS]
    declared = [channel.name for channel in sensor.channels or []]
    problems = []
    if expected is not None and sorted(declared) != sorted(expected):
        problems.append(f"{where}.channels: {_names(declared)} differ from the channels of model {sensor.model!r}: "
                        f"{_names(expected)}{_difference(declared, expected)}")
    unknown = sorted(set(declared) - set(PUMP_CHANNELS))
    if isinstance(sensor.source, SyntheticSensorSource) and unknown:
        problems.append(f"{where}.channels: the synthetic pump has no {_names(unknown)} (it has {_names(PUMP_CHANNELS)})")
    if isinstance(sensor.source, CsvSensorSource):
        problems += _csv_problems(where, sensor.source, sensor.channels, base_dir)
    if sensor.channels is None and sensor.model is None and not isinstance(sensor.source, SyntheticSensorSource):
        problems.append(f"{where}.channels: declare the group's channels (it has no model to take them from)")
    return problems


def _csv_problems(where: str, source: CsvSensorSource, channels: list[SensorChannel] | None,
                  base_dir: Path) -> list[str]:
    """The file exists and its header has the channels' columns (and the time column, when named)."""
    path = base_dir / source.path
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            header = handle.readline()
    except OSError:
        return [f"{where}.source.path: file not found: {source.path}"]
    sep = source.separator or sniff_separator(header)
    columns = {column_key(name) for name in next(csv.reader([header], delimiter=sep), [])}
    wanted = [channel.column for channel in channels or []]
    if source.time_column not in (None, "auto"):
        wanted.append(source.time_column)
    absent = [name for name in wanted if column_key(name) not in columns]
    if not absent:
        return []
    return [f"{where}.source.path: {source.path} has no column {_names(absent)} "
            f"(its columns: {_names(sorted(columns))})"]


def _package_channels(config: SiteConfig, base_dir: Path) -> dict[str, list[str] | str]:
    """Model name -> the channels its package declares (its manifest only: no checksums, no ONNX), or
    why they cannot be read; only the models that sensor groups use and whose package exists."""
    used = {sensor.model for machine in config.machines for sensor in machine.sensors if sensor.model}
    out: dict[str, list[str] | str] = {}
    for name in sorted(used & set(config.models)):
        package = resolve_model_path(config.models[name], base_dir)
        try:
            manifest = _read_any_manifest(package)
        except FileNotFoundError:
            continue  # reported as models.<name>.path
        except (PackageError, OSError, tarfile.TarError, KeyError) as exc:
            out[name] = f"cannot read the manifest of model {name!r}: {exc}"
            continue
        except ValidationError as exc:
            errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)[:3])
            out[name] = f"cannot read the manifest of model {name!r}: {package}/{MANIFEST_FILE}: {errors}"
            continue
        if not isinstance(manifest.preprocess, AnomalyPreprocess):
            out[name] = f"model {name!r} is a {manifest.task} model, a sensor group needs an anomaly model"
        elif bad := [ch for ch in manifest.preprocess.channels if not re.fullmatch(IDENTIFIER_PATTERN, ch)]:
            out[name] = f"model {name!r} names channels that are not identifiers (letters, digits, _ . -): " + _names(bad)
        else:
            out[name] = list(manifest.preprocess.channels)
    return out


MAX_MANIFEST_BYTES = 1 << 20


def _read_any_manifest(package: Path) -> Manifest:
    """The manifest of a package folder, or read straight out of a package tar (nothing extracted)."""
    if package.is_dir():
        if not (package / MANIFEST_FILE).is_file():
            raise FileNotFoundError(package)
        return read_manifest(package)
    if not (is_package_tar(package) and package.is_file()):
        raise FileNotFoundError(package)
    with tarfile.open(package) as tar:
        member = tar.getmember(MANIFEST_FILE)
        handle = tar.extractfile(member) if member.isfile() and member.size <= MAX_MANIFEST_BYTES else None
        if handle is None:
            raise PackageError(f"{package}: {MANIFEST_FILE} is not a plain file under {MAX_MANIFEST_BYTES} bytes")
        return Manifest.model_validate_json(handle.read())


def _names(names: Sequence[str]) -> str:
    return "[" + ", ".join(names) + "]"


def _difference(declared: list[str], expected: list[str]) -> str:
    missing, extra = [n for n in expected if n not in declared], [n for n in declared if n not in expected]
    parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"not in the model {', '.join(extra)}"]
                                                                       if extra else [])
    return f" ({'; '.join(parts)})" if parts else ""


def _shared_metrics_ports(machines: list[MachineConfig]) -> list[str]:
    """Per-machine metrics ports exist for agents that share a box, so two alike are a clash."""
    first: dict[int, int] = {}
    problems = []
    for index, machine in enumerate(machines):
        port = machine.metrics_port
        if port and port in first:
            problems.append(f"machines[{index}].metrics_port: {port} is also machines[{first[port]}].metrics_port "
                            "(each agent on a box needs its own port)")
        elif port:
            first[port] = index
    return problems


def _known(config: SiteConfig) -> str:
    return f" (known: {', '.join(sorted(config.models))})" if config.models else " (the models catalog is empty)"


def _duplicates(where: str, ids: list[str], what: str) -> list[str]:
    seen: set[str] = set()
    problems = []
    for index, item in enumerate(ids):
        if item in seen:
            problems.append(f"{where}[{index}].id: duplicate {what} {item!r}")
        seen.add(item)
    return problems


def _describe(error: dict[str, Any], raw: Any) -> str:
    return f"{yaml_path(error['loc'], raw)}: {_message(error)}"


def _message(error: dict[str, Any]) -> str:
    message = str(error["msg"])
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    if error["type"] == "extra_forbidden":
        return "unknown field"
    if error["type"] == "union_tag_invalid":
        return message.replace("Input tag", "type").replace("found using 'type' ", "")
    return message


def yaml_path(loc: tuple[Any, ...], raw: Any) -> str:
    """``('machines', 1, 'cameras', 0, 'source', 'file', 'path')`` -> ``machines[1].cameras[0].source.path``.

    Pydantic puts union tags and validator names in the location; walking the raw document tells
    them apart from real keys, which are kept.
    """
    text = ""
    node = raw
    for position, part in enumerate(loc):
        last = position == len(loc) - 1
        if isinstance(part, int) and isinstance(node, list):
            text += f"[{part}]"
            node = node[part] if 0 <= part < len(node) else None
        elif isinstance(node, dict) and (part in node or last):
            text += f".{part}" if text else str(part)
            node = node.get(part)
        elif isinstance(node, dict) and isinstance(part, str) and part.startswith(("function-", "tagged-union")):
            continue
        elif isinstance(node, dict) and part not in node and node.get("type") == part:
            continue  # discriminated-union tag
        else:
            text += f".{part}" if text else str(part)
            node = None
    return text or "(top level)"
