"""The ``edgeline`` command: one sub-command group per package, plus ``demo`` and ``config``."""

from __future__ import annotations

import logging
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.live import Live
from rich.logging import RichHandler

from central.client_cli import register as register_central_client
from central.tokens import (DOWNLOAD_LINK_TTL_S, READ_TOKEN_ENV, READ_TOKEN_FILE_ENV, READ_TOKEN_HELP, TOKEN_ENV,
                            TOKEN_FILE_ENV, TOKEN_HELP, find_token)
from edgeline.config import SiteConfig, load
from models.anomaly_cli import register as register_anomaly_commands
from models.package_cli import register as register_package_commands
from models.seg_cli import register as register_segmentation_commands
from stream.console import fail, needs_extra
from stream.messages import IDENTIFIER_PATTERN
from stream.service import Service
from stream.settings import ConfigError, mqtt_settings

if TYPE_CHECKING:
    from central.alerts import AlertStore

app = typer.Typer(help="Edgeline: real-time analytics on the factory floor.", no_args_is_help=True,
                  pretty_exceptions_enable=False, rich_markup_mode=None)  # plain help: whole at any width
edge_app = typer.Typer(help="The edge agent of a vision machine.", no_args_is_help=True)
stream_app = typer.Typer(help="Stream processing: the MQTT->Kafka bridge, Kafka workers, or the embedded rules engine.",
                         no_args_is_help=True)
models_app = typer.Typer(help="Model training, export and packages (training needs the 'models' extra).",
                         no_args_is_help=True)
config_app = typer.Typer(help="Site configuration files.", no_args_is_help=True)
central_app = typer.Typer(help="The control plane: fleet and model registry API, broker credentials and ACLs.",
                          no_args_is_help=True)
app.add_typer(edge_app, name="edge")
app.add_typer(stream_app, name="stream")
app.add_typer(models_app, name="models")
register_package_commands(models_app)
register_segmentation_commands(models_app)
register_anomaly_commands(models_app)
app.add_typer(config_app, name="config")
app.add_typer(central_app, name="central")
register_central_client(central_app)
grafana_app = typer.Typer(help="Grafana dashboards as code (needs the 'central' extra).", no_args_is_help=True)
app.add_typer(grafana_app, name="grafana")

console = Console()
err_console = Console(stderr=True)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="site YAML file", exists=False)]
BrokerOption = Annotated[Optional[str], typer.Option(
    "--broker", envvar="EDGELINE_BROKER", show_envvar=True,
    help="MQTT broker host:port, in place of the site file's broker.host and broker.port (e.g. 127.0.0.1:1883)")]


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=err_console, show_path=False)])


def _load_or_exit(path: Path, broker: str | None = None) -> SiteConfig:
    """The site file, with ``broker`` (host:port) in place of its broker's address if given."""
    try:
        return load(path, broker=broker)
    except ConfigError as exc:
        err_console.print(f"[bold red]{exc.source}: invalid configuration[/]")
        for problem in exc.problems:
            err_console.print(f"  {problem}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


EXIT_GAVE_UP = 70
"""Exit status (EX_SOFTWARE) of a command whose supervisor gave up on a loop that kept crashing:
systemd or compose restart it."""


def _interrupt_on_signals() -> None:
    """Make Ctrl-C and SIGTERM both raise KeyboardInterrupt in the main thread.

    Set explicitly because a process started in the background by a non-interactive shell
    inherits SIGINT as ignored, and containers stop with SIGTERM: either way the command must
    still shut down in order.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.default_int_handler)


def _run_until_signal(service: Service, start: Callable[[], None] | None = None,
                      banner: Callable[[], str] | None = None) -> None:
    """Start a service (``start``, or its own ``start()``), print ``banner()``, run until Ctrl-C
    or SIGTERM, then stop it in order."""
    _interrupt_on_signals()
    try:
        (start or service.start)()
        if banner is not None:
            console.print(banner())
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        service.stop()
    _exit_if_gave_up(service)


def _exit_if_gave_up(service: Service) -> None:
    """After an ordered stop: exit with :data:`EXIT_GAVE_UP` when the service's supervisor gave up
    (its SIGTERM is what stopped the command)."""
    if service.supervisor is not None and service.supervisor.failed.is_set():
        err_console.print(f"{service.name}: a loop kept crashing, its supervisor gave up (see the log); exiting "
                          f"with status {EXIT_GAVE_UP}", style="bold red", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_GAVE_UP)


# ---------------------------------------------------------------- config


@config_app.command("check")
def config_check(path: Annotated[Path, typer.Argument(help="site YAML file")]) -> None:
    """Validate a site file; print one line per problem with its YAML path, or a summary."""
    config = _load_or_exit(path)
    cameras = sum(len(m.cameras) for m in config.machines)
    sensors = sum(len(m.sensors) for m in config.machines)
    console.print(f"{path}: OK — site {config.site}, {len(config.machines)} machines, {cameras} cameras, "
                  f"{sensors} sensor groups, {len(config.models)} models, {len(config.rules)} rules", soft_wrap=True)


# ---------------------------------------------------------------- edge


@edge_app.command("run")
def edge_run(config: ConfigOption, machine: Annotated[str, typer.Option(help="machine id from the config")],
             broker: BrokerOption = None, log_level: str = "info") -> None:
    """Run the edge agent of one machine until Ctrl-C / SIGTERM."""
    from edge.agent import EdgeAgent

    _setup_logging(log_level)
    site = _load_or_exit(config, broker)
    try:
        agent = EdgeAgent(site, machine, base_dir=config.parent)
    except KeyError as exc:
        err_console.print(f"[bold red]{exc.args[0]}[/]")
        raise typer.Exit(2) from None
    except ConfigError as exc:  # e.g. an outbox folder it cannot write
        raise _one_line_each(exc) from None
    try:
        _run_until_signal(agent)
    except ConfigError as exc:  # e.g. its metrics port is taken
        raise _one_line_each(exc) from None


def _one_line_each(exc: ConfigError) -> typer.Exit:
    """Print ``<source>: <problem>`` per problem; the exit of bad input, to raise."""
    for problem in exc.problems:
        err_console.print(f"{exc.source}: {problem}", style="bold red", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(2)


# ---------------------------------------------------------------- stream


@stream_app.command("embedded")
def stream_embedded(config: ConfigOption, broker: BrokerOption = None,
                    metrics_port: Annotated[Optional[int], typer.Option(help="serve Prometheus metrics here")] = 9104,
                    metrics_host: Annotated[Optional[str], typer.Option(
                        help="address the metrics endpoint binds (default: metrics.host)")] = None,
                    log_level: str = "info") -> None:
    """Run the rules engine straight from MQTT (one-box installs, no Kafka); print its counts at the end."""
    from stream.embedded import EmbeddedRulesRunner
    from stream.mqtt import MqttClient

    _setup_logging(log_level)
    site = _load_or_exit(config, broker)
    client = MqttClient(mqtt_settings(site.broker), client_id=f"rules-{site.site}", clean_session=False)
    runner = EmbeddedRulesRunner(site.site, site.rules, client, lines=site.lines(),
                                 allowed_lateness_s=site.engine.allowed_lateness_s,
                                 dedupe_ttl_s=site.engine.dedupe_ttl_s, dedupe_max_entries=site.engine.dedupe_max_entries,
                                 max_states=site.engine.max_rule_states, limits=site.messages)
    host = metrics_host or site.metrics.host
    try:
        _run_until_signal(runner, lambda: runner.start(metrics_port=metrics_port, metrics_host=host),
                          lambda: f"rules {site.site}: MQTT {site.broker.host}:{site.broker.port}"
                                  + (f", metrics on {host}:{runner.metrics_port}" if runner.metrics_port else ""))
    except ConnectionError as exc:
        err_console.print(str(exc), style="bold red", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except OSError as exc:  # the metrics endpoint could not bind
        err_console.print(f"--metrics-host/--metrics-port: cannot serve metrics on {host}:{metrics_port}: "
                          f"{exc.strerror or exc}", style="bold red", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    console.print(runner.summary(), soft_wrap=True)


KafkaOption = Annotated[Optional[str], typer.Option("--kafka", help="Kafka bootstrap servers (default: stream.kafka)")]


def _with_kafka(site: SiteConfig, kafka: str | None) -> SiteConfig:
    if kafka is None:
        return site
    return site.model_copy(update={"stream": site.stream.model_copy(update={"kafka": kafka})})


@stream_app.command("bridge")
def stream_bridge(config: ConfigOption, kafka: KafkaOption = None, broker: BrokerOption = None,
                  metrics_port: Annotated[Optional[int], typer.Option(help="serve Prometheus metrics here")] = 9102,
                  log_level: str = "info") -> None:
    """Bridge the site's MQTT messages into Kafka (ack after Kafka acks), and Kafka commands back to MQTT."""
    with needs_extra("stream bridge", "kafka"):
        from stream.bridge import MqttKafkaBridge

    _setup_logging(log_level)
    site = _with_kafka(_load_or_exit(config, broker), kafka)
    bridge = MqttKafkaBridge(site.site, mqtt_settings(site.broker), site.stream.kafka, topics=site.stream.topics(),
                             partitions=site.stream.partitions, replication=site.stream.replication,
                             settings=site.stream.bridge, limits=site.messages)
    _run_until_signal(bridge, lambda: bridge.start(metrics_port=metrics_port),
                      lambda: f"bridge {site.site}: MQTT {site.broker.host}:{site.broker.port} <-> Kafka "
                              f"{site.stream.kafka}" + (f", metrics on :{bridge.metrics_port}" if bridge.metrics_port else ""))


@stream_app.command("worker")
def stream_worker(config: ConfigOption, kafka: KafkaOption = None,
                  metrics_port: Annotated[Optional[int], typer.Option(help="serve Prometheus metrics here")] = 9103,
                  log_level: str = "info") -> None:
    """Run one worker of the site (start more, on any host, to share the partitions)."""
    with needs_extra("stream worker", "kafka"):
        from stream.worker import run_worker

    _setup_logging(log_level)
    site = _with_kafka(_load_or_exit(config), kafka)
    run_worker(site, metrics_port=metrics_port)


# ---------------------------------------------------------------- central


@central_app.command("serve")
def central_serve(
    config: ConfigOption,
    broker: BrokerOption = None,
    token_file: Annotated[Optional[Path], typer.Option(envvar=TOKEN_FILE_ENV, show_envvar=False,
                                                       help=TOKEN_HELP + " (writes and reads)")] = None,
    read_token_file: Annotated[Optional[Path], typer.Option(envvar=READ_TOKEN_FILE_ENV, show_envvar=False,
                                                            help=READ_TOKEN_HELP + " (reads only)")] = None,
    db: Annotated[str, typer.Option(help="SQLAlchemy URL: sqlite:///central.db or postgresql://...")] = "sqlite:///central.db",
    storage: Annotated[Path, typer.Option(help="where uploaded packages are kept")] = Path("central-packages"),
    host: str = "127.0.0.1",
    port: int = 8080,
    public_url: Annotated[Optional[str], typer.Option(help="URL the edges download packages from "
                                                      "(default http://<host>:<port>)")] = None,
    register_unknown_machines: Annotated[bool, typer.Option(
        help="register a machine on its first heartbeat when neither the site file nor the registry has it "
             "(off: its messages are dropped and counted)")] = False,
    download_link_ttl_s: Annotated[float, typer.Option(
        min=1, help="how long the signed download links in rollout commands stay valid")] = DOWNLOAD_LINK_TTL_S,
    metrics_host: Annotated[str, typer.Option(help="address of --metrics-port")] = "127.0.0.1",
    metrics_port: Annotated[Optional[int], typer.Option(
        help="serve /metrics without a token on this port (of --metrics-host); the API's own /metrics then "
             "needs a read token (default: /metrics open on the API port)")] = None,
    evidence_dir: Annotated[Path, typer.Option(help="where the edges' evidence images are kept")] = Path(
        "central-evidence"),
    evidence_max_gb: Annotated[float, typer.Option(min=0.001, help="evidence kept in all; the oldest goes "
                                                   "first")] = 20.0,
    evidence_max_days: Annotated[float, typer.Option(min=0.001, help="evidence older than this goes")] = 30.0,
    alerts_from_kafka: Annotated[bool, typer.Option(
        "--alerts-from-kafka", help="also read the alerts from Kafka (stream.kafka, the workers' alerts topic; "
        "needs the kafka extra): for sites whose rules run on Kafka workers")] = False,
    log_level: str = "info",
) -> None:
    """Serve the fleet and model registries, keep the alerts and the edges' evidence, run rollouts
    over MQTT, and serve the operator console at /console (OpenAPI docs at /docs)."""
    with needs_extra("central serve", "central"):
        import uvicorn

        from central.api import create_api
        from central.registry import Registry
    site = _load_or_exit(config, broker)
    token, read_token = _central_tokens(token_file, read_token_file)
    from models.package import trusted_keys

    # unsigned packages refused whatever the edge requires: the builtin and configured keys, always
    keys = trusted_keys(site.signatures.model_copy(update={"require": True}), config.parent)
    registry = Registry(db, storage, keys, site.packages)
    registry.sync_site(site.site, {m.id: (m.line, [c.id for c in m.cameras]) for m in site.machines})
    from central.api import central_metrics
    from central.rollouts import RolloutManager
    from central.tokens import DownloadLinks
    from stream.mqtt import MqttClient

    from central.fleet import FleetStatus

    links = DownloadLinks(token, download_link_ttl_s)
    fleet = FleetStatus()
    manager = RolloutManager(site.site, registry, MqttClient(mqtt_settings(site.broker), f"central-{site.site}"),
                             public_url or f"http://{host}:{port}", links=links,
                             register_unknown=register_unknown_machines, fleet=fleet)
    from central.alerts import AlertListener, AlertStore
    from central.evidence import EvidenceArchive

    evidence = EvidenceArchive(registry.engine, evidence_dir, max_bytes=int(evidence_max_gb * 1e9),
                               max_age_s=evidence_max_days * 86_400, supervisor=manager.supervisor)
    alerts = AlertStore(registry.engine, registry.line_of)
    listener = AlertListener(alerts, site.site)
    manager.mqtt.subscribe(listener.topic, listener.on_message)
    kafka_alerts = _kafka_alerts(alerts, site, manager) if alerts_from_kafka else None
    manager.start()
    evidence.start()
    if kafka_alerts is not None:
        kafka_alerts.start()
    metrics_server = None
    if metrics_port is not None:
        from prometheus_client import start_http_server

        metrics_server, _ = start_http_server(metrics_port, metrics_host,
                                              registry=central_metrics(registry, manager, evidence, alerts))
    _interrupt_on_signals()  # uvicorn re-raises the SIGTERM it caught once it has shut down: let it come back here
    try:
        uvicorn.run(create_api(registry, token, manager, read_token=read_token, links=links,
                               open_metrics=metrics_port is None, evidence=evidence, alerts=alerts,
                               fleet=fleet),
                    host=host, port=port, log_level=log_level)
    except KeyboardInterrupt:
        pass
    finally:
        if kafka_alerts is not None:
            kafka_alerts.stop()
        evidence.stop()
        manager.stop()
        if metrics_server is not None:
            metrics_server.shutdown()
    _exit_if_gave_up(manager)


def _kafka_alerts(alerts: AlertStore, site: SiteConfig, manager: Service) -> Service:
    """The Kafka reader of the site's alerts topic (the kafka extra)."""
    with needs_extra("central serve --alerts-from-kafka", "kafka"):
        import kafka  # noqa: F401 - fail here, with the extra named, not in the loop

    from central.alerts import KafkaAlerts

    return KafkaAlerts(alerts, site.site, site.stream.kafka, site.stream.topics().for_kind("alert"),
                       supervisor=manager.supervisor)


def _central_tokens(token_file: Path | None, read_token_file: Path | None) -> tuple[str, str | None]:
    """The write token (required) and the read token (optional: the write token also reads)."""
    try:
        token = find_token(token_file)
        read_token = find_token(read_token_file, value_env=READ_TOKEN_ENV)
    except ValueError as exc:
        raise fail(str(exc)) from None
    if token is None:
        raise fail(f"no API token: pass --token-file, or set ${TOKEN_FILE_ENV} or ${TOKEN_ENV}")
    return token, read_token


@grafana_app.command("build")
def grafana_build(out: Annotated[Path, typer.Option(help="dashboard JSON folder (file provisioning)")] =
                  Path("deploy/grafana/dashboards")) -> None:
    """Render every dashboard to JSON for Grafana's file provisioning."""
    with needs_extra("grafana build", "central"):
        from central.dashboards import write_dashboards

    for path in write_dashboards(out):
        console.print(f"wrote {path}")


@grafana_app.command("provision")
def grafana_provision(
    url: Annotated[str, typer.Option(help="Grafana base URL, e.g. http://localhost:3000")],
    token: Annotated[str, typer.Option(help="Grafana service-account token", envvar="GRAFANA_TOKEN")],
    prometheus_url: Annotated[str, typer.Option(help="Prometheus as Grafana reaches it")] = "http://prometheus:9090",
) -> None:
    """Create/update the Prometheus datasource and push every dashboard to a running Grafana."""
    with needs_extra("grafana provision", "central"):
        from central.dashboards import provision

        for uid in provision(url, token, prometheus_url):
            console.print(f"dashboard {uid} provisioned on {url}")


@central_app.command("broker-auth")
def central_broker_auth(
    config: ConfigOption,
    out: Annotated[Path, typer.Option(help="folder for acl, passwd, credentials.yaml and secrets/")] = Path(
        "deploy/mosquitto/auth"),
) -> None:
    """Write the site's Mosquitto ACL and password file, and one secret per machine and service.

    Passwords already in OUT/credentials.yaml are kept: run it again after adding machines."""
    from central.broker_auth import write_site_auth

    site = _load_or_exit(config)
    try:
        credentials, added = write_site_auth(site, out)
    except (FileNotFoundError, RuntimeError) as exc:
        err_console.print(f"[bold red]{exc}[/]")
        raise typer.Exit(2) from None
    console.print(f"wrote {out / 'acl'}, {out / 'passwd'} and {out / 'secrets'}/<user>.pass for {len(credentials)} "
                  f"users ({len(added)} new{': ' + ', '.join(added) if added else ''}). Each process logs in with "
                  "its own: broker.username/password_file, or $EDGELINE_MQTT_USERNAME and "
                  "$EDGELINE_MQTT_PASSWORD_FILE.")


@central_app.command("machine-token")
def central_machine_token(
    machine: Annotated[list[str], typer.Option(help="machine id (repeat for several)")],
    token_file: Annotated[Optional[Path], typer.Option(envvar=TOKEN_FILE_ENV, show_envvar=False,
                                                       help=TOKEN_HELP)] = None,
    out: Annotated[Optional[Path], typer.Option(help="write <out>/<machine>.evidence-token (mode 600) instead of "
                                                "printing")] = None,
) -> None:
    """The evidence token of each machine (derived from the API token): the edge agent's
    evidence.token_file or $EDGELINE_EVIDENCE_TOKEN. It lets the machine deliver its own evidence, nothing else."""
    from central.tokens import MachineTokens

    tokens = MachineTokens(_central_tokens(token_file, None)[0])
    bad = [m for m in machine if not re.fullmatch(IDENTIFIER_PATTERN, m)]
    if bad:
        raise fail(f"not a machine id: {', '.join(map(repr, bad))}")
    for machine_id in machine:
        if out is None:
            console.print(f"{machine_id} {tokens.token(machine_id)}", soft_wrap=True)
            continue
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{machine_id}.evidence-token"
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(tokens.token(machine_id) + "\n")
        console.print(f"wrote {path}")


# ---------------------------------------------------------------- models


@models_app.command("build")
def models_build(
    out: Annotated[Path, typer.Option(help="where the packages are written")] = Path("models/packages"),
    key: Annotated[Optional[Path], typer.Option(help="Ed25519 private key that signs them")] = None,
) -> None:
    """Rebuild every builtin package from the real data (~30 min on 2 cores): train, export, quantize, gate, sign."""
    from models.build import DEFAULT_KEY, build_all

    with needs_extra("models build", "models"):
        for package in build_all(out, key or DEFAULT_KEY):
            console.print(f"{package.manifest.package_id}: {package.folder} "
                          f"(signed by {package.manifest.signature.key_id})")


# ---------------------------------------------------------------- demo


@app.command()
def demo(
    duration: Annotated[Optional[float], typer.Option(help="seconds to run; default: until Ctrl-C")] = None,
    machines: Annotated[int, typer.Option(min=1, max=50, help="simulated machines")] = 3,
    config: Annotated[Optional[Path], typer.Option(help="site YAML instead of the built-in demo site")] = None,
    seed: Annotated[int, typer.Option(help="seed of the simulated factory")] = 0,
    live: Annotated[bool, typer.Option(help="live terminal view")] = True,
    embedded_broker: Annotated[bool, typer.Option(help="use the Python broker even where Mosquitto is installed")] = False,
    console_port: Annotated[int, typer.Option(min=0, max=65535, help="where central serves the operator console "
                                              "(0: a free port)")] = 8080,
    with_console: Annotated[bool, typer.Option("--console/--no-console", help="run central with the operator "
                                               "console (needs the central extra)")] = True,
    log_level: str = "warning",
) -> None:
    """A simulated factory on this box: broker, edge agents, rules engine, central with the
    operator console, and a live view."""
    from edgeline.demo import Demo, demo_config
    from edgeline.view import DemoView

    _setup_logging(log_level)
    _interrupt_on_signals()
    site = _load_or_exit(config) if config else demo_config(machines=machines, seed=seed)
    runner = Demo(site, base_dir=config.parent if config else Path("."), prefer_mosquitto=not embedded_broker,
                  console_port=console_port if with_console else None)
    interrupted = False
    try:
        runner.start()
        if runner.central is not None:
            console.print(f"operator console: {runner.central.url}/console (sign in with the token "
                          f"{runner.central.token})", soft_wrap=True)
        elif with_console:
            console.print("no operator console: the central extra is not installed (pip install -e '.[central]')")
        view = DemoView(runner, duration)
        with Live(view.render(), console=console, refresh_per_second=4, transient=False,
                  auto_refresh=False) if live and console.is_terminal else _NoLive() as screen:
            while duration is None or time.monotonic() - runner.started < duration:
                time.sleep(0.25)
                screen.update(view.render(), refresh=True)
        if live and not console.is_terminal:  # piped: the last view once, whole
            console.print(view.render(), crop=False)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        runner.stop()
    summary = runner.summary()
    console.rule("summary" + (" (interrupted)" if interrupted else ""))
    for line in summary.lines():
        console.print(line)
    if summary.results == 0:
        err_console.print("[bold red]no results reached the broker: the pipeline did not work[/]")
        raise typer.Exit(1)
    for service in (runner, *runner.agents):
        _exit_if_gave_up(service)


class _NoLive:
    """Stands in for rich's Live when ``--no-live``: renders nothing."""

    def __enter__(self) -> "_NoLive":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, renderable: object, refresh: bool = False) -> None:
        return None


if __name__ == "__main__":
    app()
