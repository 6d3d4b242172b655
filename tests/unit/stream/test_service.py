"""The service base alone: supervised loops (restart, backoff, give-up), ordered shutdown, and a
real process that exits non-zero when its supervisor gives up."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from stream.service import Service, Supervisor

REPO = Path(__file__).resolve().parents[3]


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def never_give_up(service: str, exc: BaseException) -> None:
    raise AssertionError(f"gave up on {service}: {exc}")


def restarts_metric(registry: CollectorRegistry, service: str, subsystem: str = "test") -> float | None:
    return registry.get_sample_value(f"edgeline_{subsystem}_restarts_total", {"service": service})


def test_a_crashing_loop_is_restarted_with_backoff_and_counted_in_the_registry(caplog):
    registry = CollectorRegistry()
    supervisor = Supervisor("test", registry=registry, backoff_first_s=0.05, backoff_max_s=1.0, max_crashes=5,
                            on_give_up=never_give_up)
    service = Service("svc", supervisor=supervisor)
    runs: list[float] = []
    settled = threading.Event()

    def work() -> None:
        runs.append(time.monotonic())
        if len(runs) <= 2:
            raise RuntimeError(f"crash {len(runs)}")
        settled.set()
        service.stopping.wait()

    service.add_loop("work", work)
    with caplog.at_level(logging.ERROR, logger="stream.service"):
        service.start()
        try:
            assert settled.wait(10.0)
            assert restarts_metric(registry, "svc/work") == 2.0
            assert supervisor.restarts() == {"svc/work": 2}
            assert not supervisor.failed.is_set()
        finally:
            service.stop()
    assert runs[1] - runs[0] >= 0.05  # first backoff
    assert runs[2] - runs[1] >= 0.1  # doubled
    crashes = [r for r in caplog.records if "crashed" in r.getMessage()]
    assert len(crashes) == 2 and all(r.exc_info and "crash" in str(r.exc_info[1]) for r in crashes)
    assert "svc/work" in crashes[0].getMessage()


def test_a_supervised_loop_shows_zero_restarts_before_any_crash():
    registry = CollectorRegistry()
    supervisor = Supervisor("test", registry=registry, on_give_up=never_give_up)
    service = Service("svc", supervisor=supervisor)
    service.add_loop("idle", service.stopping.wait)
    service.start()
    try:
        assert restarts_metric(registry, "svc/idle") == 0.0
        assert supervisor.restarts() == {"svc/idle": 0}
    finally:
        service.stop()


def test_the_supervisor_gives_up_after_max_crashes_and_calls_on_give_up():
    registry = CollectorRegistry()
    gave_up: list[tuple[str, BaseException]] = []
    done = threading.Event()

    def on_give_up(service: str, exc: BaseException) -> None:
        gave_up.append((service, exc))
        done.set()

    supervisor = Supervisor("test", registry=registry, backoff_first_s=0.01, backoff_max_s=0.01, max_crashes=3,
                            on_give_up=on_give_up)
    service = Service("svc", supervisor=supervisor)
    runs = []

    def always_fails() -> None:
        runs.append(1)
        raise ValueError("broken for good")

    service.add_loop("bad", always_fails)
    service.start()
    try:
        assert done.wait(10.0)
        assert supervisor.failed.is_set()
        [(name, exc)] = gave_up
        assert name == "svc/bad" and isinstance(exc, ValueError)
        wait_for(lambda: not any(t.name == "svc/bad" for t in threading.enumerate()))
        assert len(runs) == 3  # not run again after giving up
        assert restarts_metric(registry, "svc/bad") == 2.0
    finally:
        service.stop()


def test_crashes_older_than_the_window_do_not_count_towards_giving_up():
    supervisor = Supervisor("test", registry=CollectorRegistry(), backoff_first_s=1.0, backoff_max_s=8.0,
                            max_crashes=2, crash_window_s=60.0, on_give_up=never_give_up)
    error = RuntimeError("x")
    assert supervisor.crashed("s/a", error, now=0.0) == 1.0
    assert supervisor.crashed("s/a", error, now=61.0) == 1.0  # the first fell out of the window
    gave_up = []
    supervisor.on_give_up = lambda service, exc: gave_up.append(service)
    assert supervisor.crashed("s/a", error, now=62.0) is None
    assert gave_up == ["s/a"] and supervisor.failed.is_set()


def test_backoff_doubles_up_to_its_cap():
    supervisor = Supervisor("test", registry=CollectorRegistry(), backoff_first_s=0.5, backoff_max_s=3.0,
                            max_crashes=10, on_give_up=never_give_up)
    assert [supervisor.crashed("s/a", RuntimeError(), now=float(i)) for i in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_supervisors_of_one_subsystem_share_one_counter_per_registry():
    registry = CollectorRegistry()
    first = Supervisor("test", registry=registry, on_give_up=never_give_up)
    second = Supervisor("test", registry=registry, on_give_up=never_give_up)  # no duplicate registration
    first.crashed("a/x", RuntimeError())
    second.crashed("b/x", RuntimeError())
    assert restarts_metric(registry, "a/x") == 1.0 and restarts_metric(registry, "b/x") == 1.0
    assert first.restarts() == {"a/x": 1} and second.restarts() == {"b/x": 1}
    Supervisor("test", registry=CollectorRegistry(), on_give_up=never_give_up)  # another registry: its own


def test_children_start_in_order_and_stop_in_reverse_before_the_parent():
    events: list[str] = []

    class Part(Service):
        def on_start(self) -> None:
            events.append(f"start {self.name}")

        def on_stop(self) -> None:
            events.append(f"stop {self.name}")

    parent = Part("parent")
    intake, flush = Part("intake"), Part("flush")
    assert parent.add_child(intake) is intake
    parent.add_child(flush)
    parent.start()
    parent.stop()
    assert events == ["start parent", "start intake", "start flush", "stop flush", "stop intake", "stop parent"]
    assert parent.stopping.is_set() and intake.stopping.is_set() and flush.stopping.is_set()


def test_a_child_without_a_supervisor_takes_its_parents():
    supervisor = Supervisor("test", registry=CollectorRegistry(), on_give_up=never_give_up)
    parent = Service("parent", supervisor=supervisor)
    own = Supervisor("other", registry=CollectorRegistry(), on_give_up=never_give_up)
    assert parent.add_child(Service("a")).supervisor is supervisor
    assert parent.add_child(Service("b", supervisor=own)).supervisor is own


def test_stop_cuts_a_backoff_short():
    supervisor = Supervisor("test", registry=CollectorRegistry(), backoff_first_s=60.0, backoff_max_s=60.0,
                            on_give_up=never_give_up)
    service = Service("svc", supervisor=supervisor)
    runs = []

    def crash_once() -> None:
        runs.append(1)
        raise RuntimeError("once")

    service.add_loop("work", crash_once)
    service.start()
    wait_for(lambda: supervisor.restarts() == {"svc/work": 1})  # now waiting its 60 s backoff
    began = time.monotonic()
    service.stop(timeout_s=10.0)
    assert time.monotonic() - began < 5.0
    assert not any(t.name == "svc/work" for t in threading.enumerate())
    assert runs == [1]


def test_a_loop_that_returns_is_not_restarted():
    supervisor = Supervisor("test", registry=CollectorRegistry(), backoff_first_s=0.01, on_give_up=never_give_up)
    service = Service("svc", supervisor=supervisor)
    runs = []
    service.add_loop("once", lambda: runs.append(1))
    service.start()
    try:
        wait_for(lambda: not any(t.name == "svc/once" for t in threading.enumerate()))
        assert runs == [1]
        assert supervisor.restarts() == {"svc/once": 0}
        assert not service.stopping.is_set()
    finally:
        service.stop()


def test_an_unsupervised_crash_is_logged_and_the_loop_stays_dead(caplog):
    service = Service("svc")
    runs = []

    def crash() -> None:
        runs.append(1)
        raise RuntimeError("nobody watches")

    service.add_loop("work", crash)
    with caplog.at_level(logging.ERROR, logger="stream.service"):
        service.start()
        try:
            wait_for(lambda: not any(t.name == "svc/work" for t in threading.enumerate()))
        finally:
            service.stop()
    assert runs == [1]
    [crashed] = [r for r in caplog.records if r.exc_info]
    assert "svc/work" in crashed.getMessage() and "nobody watches" in str(crashed.exc_info[1])
    assert any("stays stopped" in r.getMessage() for r in caplog.records)


def test_start_is_idempotent_and_a_stopped_service_starts_again():
    service = Service("svc")
    runs = []

    def work() -> None:
        runs.append(1)
        service.stopping.wait()

    service.add_loop("work", work)
    service.start()
    service.start()
    wait_for(lambda: runs == [1])
    assert sum(t.name == "svc/work" for t in threading.enumerate()) == 1
    assert not service.wait(0.0)
    service.stop()
    assert service.wait(0.0)
    service.start()
    try:
        wait_for(lambda: runs == [1, 1])
    finally:
        service.stop()


def test_a_child_that_fails_to_start_stops_the_ones_started_before_it_and_then_its_parent():
    stopped = []

    class Ok(Service):
        def on_stop(self) -> None:
            stopped.append(self.name)

    class Broken(Service):
        def on_start(self) -> None:
            raise ConnectionError("broker down")

    parent = Ok("parent")
    parent.add_child(Ok("first"))
    parent.add_child(Broken("second"))
    with pytest.raises(ConnectionError):
        parent.start()
    assert stopped == ["first", "parent"]
    parent.stop()  # never started: nothing to do
    assert stopped == ["first", "parent"]


CHILD = textwrap.dedent("""
    import signal, sys
    from prometheus_client import CollectorRegistry
    from stream.service import Service, Supervisor

    supervisor = Supervisor("child", registry=CollectorRegistry(), backoff_first_s=0.01, backoff_max_s=0.01,
                            max_crashes=3)
    service = Service("doomed", supervisor=supervisor)

    def always_raises():
        raise RuntimeError("always")

    service.add_loop("work", always_raises)
    if sys.argv[1] == "handled":  # as the CLI does: SIGTERM becomes an ordered stop
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    service.start()
    try:
        service.wait()  # blocks forever unless the give-up ends it
    except KeyboardInterrupt:
        service.stop()
        sys.exit(70 if supervisor.failed.is_set() else 0)
    sys.exit(0)
""")


def run_child(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, mode], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def test_giving_up_ends_a_real_process_with_a_non_zero_status():
    child = run_child("default")
    assert child.returncode != 0, child.stderr
    assert "crashed 3 times" in child.stderr and "giving up" in child.stderr


def test_a_process_that_handles_sigterm_sees_failed_and_exits_70():
    child = run_child("handled")
    assert child.returncode == 70, child.stderr
    assert "giving up" in child.stderr
