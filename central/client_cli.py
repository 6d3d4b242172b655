"""`edgeline central ...` client commands: every registry and rollout operation over the HTTP API."""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

UrlOption = Annotated[str, typer.Option("--url", envvar="EDGELINE_CENTRAL_URL", help="central base URL")]
TokenOption = Annotated[Path | None, typer.Option("--token-file", envvar="EDGELINE_CENTRAL_TOKEN_FILE",
                                                  help="file holding the API token (writes only)")]


def register(app: typer.Typer) -> None:
    app.command("upload")(upload)
    app.command("models")(models)
    app.command("model")(model)
    app.command("download")(download)
    app.command("machines")(machines)
    app.command("register-machine")(register_machine)
    app.command("rollout")(rollout)
    app.command("rollouts")(rollouts)
    app.command("rollout-status")(rollout_status)
    app.command("rollout-control")(rollout_control)


def _request(method: str, url: str, token_file: Path | None = None, **kwargs: Any) -> httpx.Response:
    """The API's answer; a 4xx/5xx or no answer prints the reason and exits (1, or 2 unreachable)."""
    headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"} if token_file else {}
    try:
        response = httpx.request(method, url, headers=headers, timeout=120, **kwargs)
    except httpx.TransportError as exc:
        err_console.print(f"[bold red]cannot reach {url}: {exc}[/]")
        raise typer.Exit(2) from None
    if response.status_code >= 400:
        detail = response.json().get("detail") if "json" in response.headers.get("content-type", "") else response.text
        err_console.print(f"[bold red]{response.status_code}: {detail}[/]")
        raise typer.Exit(1)
    return response


def _print_json(data: Any) -> None:
    """Plain JSON on stdout (rich would wrap long lines inside strings and break it)."""
    typer.echo(json.dumps(data, indent=2))


def _call(method: str, url: str, token_file: Path | None = None, **kwargs: Any) -> Any:
    return _request(method, url, token_file, **kwargs).json()


def upload(package: Annotated[Path, typer.Argument(help="package folder or .tar")], url: UrlOption = "http://127.0.0.1:8080",
           token_file: TokenOption = None) -> None:
    """Upload a signed model package to the registry."""
    from models.package import write_package_tar

    with tempfile.TemporaryDirectory() as tmp:
        tar = package if package.is_file() else write_package_tar(package, Path(tmp) / "package.tar")
        stored = _call("POST", f"{url}/models", token_file, content=tar.read_bytes())
    console.print(f"registered {stored['id']} (sha256 {stored['sha256'][:12]}…, signed by {stored['key_id']})")


def models(url: UrlOption = "http://127.0.0.1:8080") -> None:
    """List the packages in the registry."""
    for stored in _call("GET", f"{url}/models"):
        console.print(f"{stored['id']}  {stored['task']}  sha256 {stored['sha256'][:12]}…")


def model(package_id: str, url: UrlOption = "http://127.0.0.1:8080") -> None:
    """A package's registry entry and manifest."""
    _print_json(_call("GET", f"{url}/models/{package_id}"))


def download(package_id: str, out: Annotated[Path, typer.Option(help="where the .tar goes")] = Path("."),
             url: UrlOption = "http://127.0.0.1:8080") -> None:
    """Download a package .tar; its sha256 is checked against the X-Checksum-Sha256 header."""
    response = _request("GET", f"{url}/models/{package_id}/download")
    digest = hashlib.sha256(response.content).hexdigest()
    if digest != response.headers.get("X-Checksum-Sha256"):
        err_console.print(f"[bold red]{package_id}: sha256 {digest} does not match the registry's "
                          f"{response.headers.get('X-Checksum-Sha256')}[/]")
        raise typer.Exit(1)
    path = out / f"{package_id}.tar" if out.is_dir() else out
    path.write_bytes(response.content)
    console.print(f"wrote {path} (sha256 {digest[:12]}…)")


def machines(url: UrlOption = "http://127.0.0.1:8080") -> None:
    """The fleet: each machine's line, status, last heartbeat and the package each model runs."""
    table = Table("machine", "site", "line", "status", "last heartbeat", "cameras", "models")
    now = time.time()
    for row in _call("GET", f"{url}/machines"):
        beat = f"{now - row['last_heartbeat']:.0f} s ago" if row["last_heartbeat"] else "never"
        table.add_row(row["id"], row["site"], row["line"], row["status"], beat, ", ".join(row["cameras"]),
                      ", ".join(f"{m}={p}" for m, p in row["models"].items()))
    console.print(table)


def register_machine(machine_id: str, site: Annotated[str, typer.Option(help="site id")],
                     line: str = "", cameras: Annotated[str, typer.Option(help="comma-separated camera ids")] = "",
                     url: UrlOption = "http://127.0.0.1:8080", token_file: TokenOption = None) -> None:
    """Register a machine (or change its site, line and cameras)."""
    body = {"site": site, "line": line, "cameras": [c for c in cameras.split(",") if c]}
    row = _call("PUT", f"{url}/machines/{machine_id}", token_file, json=body)
    console.print(f"machine {row['id']}: site {row['site']}, line {row['line'] or '-'}, {len(row['cameras'])} cameras")


def rollout(package: Annotated[str, typer.Option(help="package id, e.g. seg-synth-1.0.0-int8")],
            model: Annotated[str, typer.Option(help="model name in the site config")],
            machines: Annotated[str, typer.Option(help="comma-separated machine ids")],
            stages: str = "0,0.25,1", soak_s: float = 60.0, max_latency_ratio: float = 1.2,
            max_error_rate: float = 0.01, max_drift: float = 0.05,
            min_shadow_agreement: Annotated[float | None, typer.Option(
                help="shadow each stage first; promote only at this mask agreement (0-1)")] = None,
            shadow_frames: int = 50, url: UrlOption = "http://127.0.0.1:8080", token_file: TokenOption = None) -> None:
    """Start a staged rollout (canary, 25%, all by default)."""
    body = {"package": package, "model": model, "machines": machines.split(","),
            "stages": [float(s) for s in stages.split(",")], "soak_s": soak_s, "max_latency_ratio": max_latency_ratio,
            "max_error_rate": max_error_rate, "max_drift": max_drift, "min_shadow_agreement": min_shadow_agreement,
            "shadow_frames": shadow_frames}
    state = _call("POST", f"{url}/rollouts", token_file, json=body)
    console.print(f"rollout {state['id']}: {state['previous']} -> {state['package']}, {state['phase']}")


def rollouts(url: UrlOption = "http://127.0.0.1:8080") -> None:
    """Every rollout: package, phase, stage and failure."""
    table = Table("rollout", "package", "previous", "phase", "stage", "failure")
    for row in _call("GET", f"{url}/rollouts"):
        table.add_row(row["id"], row["package"], row["previous"], row["phase"] + (" (paused)" if row["paused"] else ""),
                      f"{row['stage']}/{row['stages']}", row["failure"] or "")
    console.print(table)


def rollout_status(rollout_id: str, url: UrlOption = "http://127.0.0.1:8080") -> None:
    """A rollout's phase, stage and history."""
    state = _call("GET", f"{url}/rollouts/{rollout_id}")
    _print_json(state)


def rollout_control(rollout_id: str, verb: Annotated[str, typer.Argument(help="pause, resume or abort")],
                    url: UrlOption = "http://127.0.0.1:8080", token_file: TokenOption = None) -> None:
    """Pause, resume or abort a rollout (abort rolls back)."""
    state = _call("POST", f"{url}/rollouts/{rollout_id}/{verb}", token_file)
    console.print(f"rollout {rollout_id}: {state['phase']}{' (paused)' if state['paused'] else ''}")
