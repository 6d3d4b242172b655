"""`edgeline central ...` client commands: every registry and rollout operation over the HTTP API.

They need only HTTP (httpx, in the base install), never the ``central`` extra. Listings print a
table (whole when piped) or, with ``--json``, the API's answer as it came. Writes send the write
token; reads send the read token, or the write token when that is the one given.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console

from central.rollout_machine import GATE_HELP, Operation
from central.tokens import (READ_TOKEN_ENV, READ_TOKEN_FILE_ENV, READ_TOKEN_HELP, TOKEN_ENV, TOKEN_FILE_ENV,
                            TOKEN_HELP, find_read_token, find_token)
from stream.console import Column, TableOutput, fail, print_json, print_table

console = Console()

UrlOption = Annotated[str, typer.Option("--url", envvar="EDGELINE_CENTRAL_URL", help="central base URL")]
TokenOption = Annotated[Path | None, typer.Option("--token-file", envvar=TOKEN_FILE_ENV, show_envvar=False,
                                                  help=TOKEN_HELP)]
ReadTokenOption = Annotated[Path | None, typer.Option("--read-token-file", envvar=READ_TOKEN_FILE_ENV,
                                                      show_envvar=False, help=READ_TOKEN_HELP)]
JsonOption = Annotated[bool, typer.Option("--json", help="print the API's answer as JSON instead of a table")]
STAGE_BASE_NOTE = "stages counted from 1, 0 before the first"
POLL_S = 0.5
DONE_PHASES = ("completed", "rolled_back")


def register(app: typer.Typer) -> None:
    app.command("upload")(upload)
    app.command("models")(models)
    app.command("model")(model)
    app.command("download")(download)
    app.command("machines")(machines)
    app.command("wait")(wait)
    app.command("register-machine")(register_machine)
    app.command("rollout")(rollout)
    app.command("rollouts")(rollouts)
    app.command("rollout-status")(rollout_status)
    app.command("rollout-control")(rollout_control)


def _headers(token_file: Path | None, read_token_file: Path | None, write: bool) -> dict[str, str]:
    """The bearer token for a write (the write token) or a read (the read token, else the write token)."""
    try:
        token = find_token(token_file) if write else find_read_token(read_token_file, token_file)
    except ValueError as exc:
        raise fail(str(exc)) from None
    return {"Authorization": f"Bearer {token}"} if token else {}


def _request(method: str, url: str, token_file: Path | None = None, read_token_file: Path | None = None,
             **kwargs: Any) -> httpx.Response:
    """The API's answer; a 4xx/5xx or no answer prints the reason and exits (1, or 2 unreachable)."""
    headers = _headers(token_file, read_token_file, method != "GET")
    try:
        response = httpx.request(method, url, headers=headers, timeout=120, **kwargs)
    except httpx.TransportError as exc:
        raise fail(f"cannot reach {url}: {exc}") from None
    if response.status_code >= 400:
        raise fail(f"{response.status_code}: {_reason(response)}", status=1)
    return response


def _reason(response: httpx.Response) -> str:
    """The API's ``detail`` in one line (FastAPI's validation errors are a list)."""
    if "json" not in response.headers.get("content-type", ""):
        return response.text
    detail = response.json().get("detail")
    if isinstance(detail, list):
        detail = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', [])[1:])}: {e.get('msg')}" for e in detail)
    if response.status_code == 401 and response.request.method == "GET":
        detail = (f"{detail} (give the read token: --read-token-file, ${READ_TOKEN_FILE_ENV} or ${READ_TOKEN_ENV}; "
                  f"or the write token: --token-file, ${TOKEN_FILE_ENV} or ${TOKEN_ENV})")
    elif response.status_code == 401:
        detail = f"{detail} (give the token: --token-file, ${TOKEN_FILE_ENV} or ${TOKEN_ENV})"
    return str(detail)


def _call(method: str, url: str, token_file: Path | None = None, read_token_file: Path | None = None,
          **kwargs: Any) -> Any:
    return _request(method, url, token_file, read_token_file, **kwargs).json()


def _utc(ts: float) -> str:
    """Epoch seconds as ISO 8601 UTC, e.g. 2025-06-01T12:00:05Z."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def upload(package: Annotated[Path, typer.Argument(help="package folder or .tar")],
           url: UrlOption = "http://127.0.0.1:8080", token_file: TokenOption = None) -> None:
    """Upload a signed model package to the registry (a folder is checked and packed first)."""
    from models.package import PackageError, write_package_tar

    with tempfile.TemporaryDirectory() as tmp:
        try:
            tar = package if package.is_file() else write_package_tar(package, Path(tmp) / "package.tar")
        except PackageError as exc:
            raise fail(f"package refused: {exc}", status=1) from None
        stored = _call("POST", f"{url}/models", token_file, content=tar.read_bytes())
    typer.echo(f"registered {stored['id']} (sha256 {stored['sha256'][:12]}…, signed by {stored['key_id']})")


def models(url: UrlOption = "http://127.0.0.1:8080", as_json: JsonOption = False,
           read_token_file: ReadTokenOption = None, token_file: TokenOption = None) -> None:
    """List the packages in the registry."""
    stored = _call("GET", f"{url}/models", token_file, read_token_file)
    if as_json:
        print_json(stored)
        return
    print_table(TableOutput([Column("package", key=True), "task", Column("sha256", key=True),
                             Column("signed by", key=True)],
                            [[p["id"], p["task"], p["sha256"][:12], p["key_id"]] for p in stored]), console)


def model(package_id: str, url: UrlOption = "http://127.0.0.1:8080", read_token_file: ReadTokenOption = None,
          token_file: TokenOption = None) -> None:
    """A package's registry entry and manifest (JSON)."""
    print_json(_call("GET", f"{url}/models/{package_id}", token_file, read_token_file))


def download(package_id: str, out: Annotated[Path, typer.Option(help="where the .tar goes")] = Path("."),
             url: UrlOption = "http://127.0.0.1:8080", read_token_file: ReadTokenOption = None,
             token_file: TokenOption = None) -> None:
    """Download a package .tar; its sha256 is checked against the X-Checksum-Sha256 header."""
    response = _request("GET", f"{url}/models/{package_id}/download", token_file, read_token_file)
    digest = hashlib.sha256(response.content).hexdigest()
    if digest != response.headers.get("X-Checksum-Sha256"):
        raise fail(f"{package_id}: sha256 {digest} does not match the registry's "
                   f"{response.headers.get('X-Checksum-Sha256')}", status=1)
    path = out / f"{package_id}.tar" if out.is_dir() else out
    path.write_bytes(response.content)
    typer.echo(f"wrote {path} (sha256 {digest[:12]}…)")


def machines(url: UrlOption = "http://127.0.0.1:8080", as_json: JsonOption = False,
             read_token_file: ReadTokenOption = None, token_file: TokenOption = None) -> None:
    """The fleet: each machine's line, status, last heartbeat and the package each model runs."""
    fleet = _call("GET", f"{url}/machines", token_file, read_token_file)
    if as_json:
        print_json(fleet)
        return
    now = time.time()
    rows = [[row["id"], row["site"], row["line"], row["status"],
             f"{now - row['last_heartbeat']:.0f} s ago" if row["last_heartbeat"] else "never",
             ", ".join(row["cameras"]), "\n".join(f"{m}={p}" for m, p in row["models"].items())] for row in fleet]
    print_table(TableOutput([Column("machine", key=True), "site", "line", "status", "last heartbeat", "cameras",
                             Column("models", key=True)], rows), console)


def wait(machines: Annotated[str, typer.Option(help="comma-separated machine ids that must have reported")],
         timeout: Annotated[float, typer.Option(help="seconds to wait at most")] = 60.0,
         url: UrlOption = "http://127.0.0.1:8080", read_token_file: ReadTokenOption = None,
         token_file: TokenOption = None) -> None:
    """Wait until central answers and every one of the machines has sent a heartbeat (exit 1 on timeout)."""
    wanted = [m for m in machines.split(",") if m]
    headers = _headers(token_file, read_token_file, write=False)
    deadline = time.monotonic() + timeout
    reported = _reported(url, headers)
    while (reported is None or not set(wanted) <= reported) and time.monotonic() < deadline:
        time.sleep(POLL_S)
        reported = _reported(url, headers)
    if reported is None:
        raise fail(f"central at {url} did not answer in {timeout:g} s", status=1)
    missing = [m for m in wanted if m not in reported]
    if missing:
        raise fail(f"no heartbeat from {', '.join(missing)} at {url} in {timeout:g} s", status=1)
    typer.echo(f"central at {url}: {', '.join(wanted)} reported")


def _reported(url: str, headers: dict[str, str]) -> set[str] | None:
    """The machines central has had a heartbeat from; None while it does not answer. A refused
    token prints the reason and exits 1."""
    try:
        response = httpx.get(f"{url}/machines", headers=headers, timeout=5)
    except httpx.TransportError:
        return None
    if response.status_code in (401, 403):
        raise fail(f"{response.status_code}: {_reason(response)}", status=1)
    if response.status_code >= 400:
        return None
    fleet = response.json()
    return {row["id"] for row in fleet if row["last_heartbeat"]}


def register_machine(machine_id: str, site: Annotated[str, typer.Option(help="site id")],
                     line: str = "", cameras: Annotated[str, typer.Option(help="comma-separated camera ids")] = "",
                     url: UrlOption = "http://127.0.0.1:8080", token_file: TokenOption = None) -> None:
    """Register a machine (or change its site, line and cameras)."""
    body = {"site": site, "line": line, "cameras": [c for c in cameras.split(",") if c]}
    row = _call("PUT", f"{url}/machines/{machine_id}", token_file, json=body)
    typer.echo(f"machine {row['id']}: site {row['site']}, line {row['line'] or '-'}, {len(row['cameras'])} cameras")


def _fractions(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",")]
    except ValueError:
        raise fail(f"--stages {text!r}: give fractions of the machines separated by commas, e.g. 0,0.25,1") from None


def rollout(package: Annotated[str, typer.Option(help="package id, e.g. seg-synth-1.0.0-int8")],
            model: Annotated[str, typer.Option(help="model name in the site config")],
            machines: Annotated[str, typer.Option(help="comma-separated machine ids")],
            stages: Annotated[str, typer.Option(help=GATE_HELP["stages"])] = "0,0.25,1",
            soak_s: Annotated[float, typer.Option(help=GATE_HELP["soak_s"])] = 60.0,
            max_latency_ratio: Annotated[float, typer.Option(help=GATE_HELP["max_latency_ratio"])] = 1.2,
            max_error_rate: Annotated[float, typer.Option(help=GATE_HELP["max_error_rate"])] = 0.01,
            max_drift: Annotated[float, typer.Option(help=GATE_HELP["max_drift"])] = 0.05,
            min_shadow_agreement: Annotated[float | None, typer.Option(help=GATE_HELP["min_shadow_agreement"])] = None,
            shadow_frames: Annotated[int, typer.Option(help=GATE_HELP["shadow_frames"])] = 50,
            wait: Annotated[bool, typer.Option("--wait", help="follow the rollout to its end, printing its "
                                               "history; exit 1 if it is rolled back")] = False,
            url: UrlOption = "http://127.0.0.1:8080", token_file: TokenOption = None) -> None:
    """Start a staged rollout (canary, 25%, all by default); each stage is gated, a failed gate rolls back."""
    body = {"package": package, "model": model, "machines": machines.split(","), "stages": _fractions(stages),
            "soak_s": soak_s, "max_latency_ratio": max_latency_ratio, "max_error_rate": max_error_rate,
            "max_drift": max_drift, "min_shadow_agreement": min_shadow_agreement, "shadow_frames": shadow_frames}
    state = _call("POST", f"{url}/rollouts", token_file, json=body)
    typer.echo(f"rollout {state['id']}: {state['previous']} -> {state['package']}, {state['phase']}")
    if wait:
        _follow(url, state["id"], token_file)


def _follow(url: str, rollout_id: str, token_file: Path | None) -> None:
    """Print the rollout's history as it grows until it ends; exit 1 when it was rolled back."""
    shown = 0
    while True:
        state = _call("GET", f"{url}/rollouts/{rollout_id}", token_file)
        for entry in state["history"][shown:]:
            typer.echo(f"{_utc(entry['ts'])}  {entry['text']}")
        shown = len(state["history"])
        if state["phase"] in DONE_PHASES:
            break
        time.sleep(POLL_S)
    typer.echo(f"rollout {rollout_id}: {state['phase']}" + (f" ({state['failure']})" if state["failure"] else ""))
    if state["phase"] == "rolled_back":
        raise typer.Exit(1)


def rollouts(url: UrlOption = "http://127.0.0.1:8080", as_json: JsonOption = False,
             read_token_file: ReadTokenOption = None, token_file: TokenOption = None) -> None:
    """Every rollout: package, the package it replaces, phase and stage; failures below the table."""
    listed = _call("GET", f"{url}/rollouts", token_file, read_token_file)
    if as_json:
        print_json(listed)
        return
    rows = [[row["id"], row["package"], row["previous"], row["phase"] + (" (paused)" if row["paused"] else ""),
             f"{row['stage']}/{row['stages']}"] for row in listed]
    print_table(TableOutput([Column("rollout", key=True), Column("package", key=True), Column("previous", key=True),
                             "phase", Column("stage", numeric=True)], rows), console)
    for row in listed:
        if row["failure"]:
            typer.echo(f"{row['id']} failed: {row['failure']}")


def rollout_status(rollout_id: str, url: UrlOption = "http://127.0.0.1:8080", as_json: JsonOption = False,
                   read_token_file: ReadTokenOption = None, token_file: TokenOption = None) -> None:
    """A rollout's phase, stage and history (times in UTC; stages are counted from 1)."""
    state = _call("GET", f"{url}/rollouts/{rollout_id}", token_file, read_token_file)
    if as_json:
        print_json(state)
        return
    typer.echo(f"rollout {state['id']}: {state['previous']} -> {state['package']} (model {state['model']}) on "
               f"{', '.join(state['machines'])}")
    typer.echo(f"{state['phase']}{' (paused)' if state['paused'] else ''}, stage {state['stage']} of "
               f"{state['stages']} ({STAGE_BASE_NOTE})")
    if state["failure"]:
        typer.echo(f"failure: {state['failure']}")
    rows = [[_utc(e["ts"]), e["phase"], str(e["stage"]), e["text"]] for e in state["history"]]
    print_table(TableOutput([Column("time (UTC)", key=True), "phase", Column("stage", numeric=True), "what"], rows),
                console)


def rollout_control(rollout_id: str, operation: Annotated[Operation, typer.Argument(help="abort rolls back")],
                    url: UrlOption = "http://127.0.0.1:8080", token_file: TokenOption = None) -> None:
    """Pause, resume or abort a rollout (abort rolls back)."""
    state = _call("POST", f"{url}/rollouts/{rollout_id}/{operation.value}", token_file)
    typer.echo(f"rollout {rollout_id}: {state['phase']}{' (paused)' if state['paused'] else ''}")
