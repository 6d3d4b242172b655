"""A command whose supervisor gives up stops in order and exits non-zero (70), so that systemd or
compose restart it; a command stopped by a plain SIGTERM exits normally."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import pytest
import typer
from prometheus_client import CollectorRegistry

from edgeline.cli import EXIT_GAVE_UP, _run_until_signal
from stream.service import Service, Supervisor, exit_process


@pytest.fixture(autouse=True)
def restore_signal_handlers() -> Iterator[None]:
    """_run_until_signal turns SIGINT and SIGTERM into KeyboardInterrupt; put pytest's back after."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


class Crashing(Service):
    """One loop that raises every time it runs, under a supervisor that gives up after two crashes
    with the default give-up, SIGTERM to the main thread (named here: the suite's conftest turns
    the default into a test failure)."""

    def __init__(self) -> None:
        super().__init__("crashing", supervisor=Supervisor("clitest", registry=CollectorRegistry(),
                                                            backoff_first_s=0.01, max_crashes=2,
                                                            on_give_up=exit_process))
        self.stopped = threading.Event()
        self.add_loop("step", self.step)

    def step(self) -> None:
        raise RuntimeError("a real fault")

    def on_stop(self) -> None:
        self.stopped.set()


def test_a_supervisor_that_gives_up_makes_the_command_exit_70_after_an_ordered_stop() -> None:
    service = Crashing()
    with pytest.raises(typer.Exit) as exit_:
        _run_until_signal(service)
    assert exit_.value.exit_code == EXIT_GAVE_UP == 70
    assert service.supervisor is not None and service.supervisor.failed.is_set()
    assert service.stopped.is_set()


def test_a_plain_sigterm_stops_the_command_in_order_and_returns() -> None:
    service = Service("quiet")
    timer = threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        _run_until_signal(service)  # returns: no typer.Exit
    finally:
        timer.cancel()
    assert service.stopping.is_set()
