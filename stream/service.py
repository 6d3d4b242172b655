"""One service base for every long-running part: start/stop, ordered shutdown, supervised loops.

A :class:`Service` is a named part with ``start()``/``stop()`` and a ``stopping`` event its loops
watch. Its children start after its own ``on_start()``, in the order they were added, and stop in
reverse order before its own ``on_stop()``, so a parent can stop intake before what intake feeds.

A loop (:meth:`Service.add_loop`) runs in its own thread, named ``<service>/<loop>``, until it
returns or the service is stopping. A loop that raises while not stopping is logged with its
traceback; under a :class:`Supervisor` it is counted (``edgeline_<subsystem>_restarts_total``,
labelled ``service="<service>/<loop>"``) and run again after a backoff (``backoff_first_s``
doubling per crash up to ``backoff_max_s``; ``stop()`` cuts the wait short). After
``max_crashes`` crashes within ``crash_window_s`` the supervisor gives up: it logs at CRITICAL,
sets ``failed`` and calls ``on_give_up``, whose default sends SIGTERM to the process's main thread,
so a process left as it is exits non-zero, and a command that turns SIGTERM into an ordered stop
sees ``supervisor.failed`` and exits non-zero (70) itself; systemd or compose then restart it.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable

from prometheus_client import REGISTRY, CollectorRegistry, Counter

log = logging.getLogger(__name__)

_COUNTERS: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, Counter]] = weakref.WeakKeyDictionary()
"""One restarts counter per (registry, subsystem): several supervisors of a subsystem share it."""
_COUNTERS_LOCK = threading.Lock()


def _restarts_counter(registry: CollectorRegistry, subsystem: str) -> Counter:
    with _COUNTERS_LOCK:
        counters = _COUNTERS.setdefault(registry, {})
        if subsystem not in counters:
            counters[subsystem] = Counter(f"edgeline_{subsystem}_restarts", f"Crashed loops of the {subsystem} "
                                          "restarted by their supervisor", ["service"], registry=registry)
        return counters[subsystem]


def exit_process(service: str, exc: BaseException) -> None:
    """The default give-up: SIGTERM to the main thread. Left at its default, SIGTERM ends the
    process (status -15); a command that handles it stops in order and exits non-zero because
    ``supervisor.failed`` is set. Sent to the main thread itself so that a wait there is cut short."""
    main = threading.main_thread().ident
    assert main is not None  # the main thread always runs
    signal.pthread_kill(main, signal.SIGTERM)


class Supervisor:
    """Restarts crashed loops with backoff, counts restarts, gives up after repeated crashes."""

    def __init__(self, subsystem: str, *, registry: CollectorRegistry | None = None,
                 backoff_first_s: float = 0.1, backoff_max_s: float = 10.0,
                 max_crashes: int = 5, crash_window_s: float = 60.0,
                 on_give_up: Callable[[str, BaseException], None] | None = None) -> None:
        if max_crashes < 1:
            raise ValueError(f"max_crashes must be >= 1 (got {max_crashes})")
        self.subsystem = subsystem
        self.backoff_first_s = backoff_first_s
        self.backoff_max_s = backoff_max_s
        self.max_crashes = max_crashes
        self.crash_window_s = crash_window_s
        self.on_give_up = on_give_up or exit_process
        self.failed = threading.Event()
        """Set when the supervisor gave up on a loop."""
        self._counter = _restarts_counter(registry if registry is not None else REGISTRY, subsystem)
        self._restarts: dict[str, int] = {}
        self._crashes: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def restarts(self) -> dict[str, int]:
        """Service name (``<service>/<loop>``) -> restarts so far (for heartbeats)."""
        with self._lock:
            return dict(self._restarts)

    def watch(self, service: str) -> None:
        """A loop comes under supervision: its restarts show as 0 until it crashes."""
        with self._lock:
            self._restarts.setdefault(service, 0)
        self._counter.labels(service)

    def crashed(self, service: str, exc: BaseException, now: float | None = None) -> float | None:
        """``service`` crashed with ``exc``: the seconds to wait before running it again, or None
        when this was its ``max_crashes``-th crash within ``crash_window_s`` and the supervisor gave up."""
        now = time.monotonic() if now is None else now
        with self._lock:
            crashes = self._crashes.setdefault(service, deque())
            crashes.append(now)
            while crashes and crashes[0] < now - self.crash_window_s:
                crashes.popleft()
            recent = len(crashes)
            if recent < self.max_crashes:
                self._restarts[service] = self._restarts.get(service, 0) + 1
        if recent >= self.max_crashes:
            log.critical("%s: %s crashed %d times within %.0f s; giving up (%s: %s)", self.subsystem, service, recent,
                         self.crash_window_s, type(exc).__name__, exc)
            self.failed.set()
            self.on_give_up(service, exc)
            return None
        self._counter.labels(service).inc()
        return min(self.backoff_max_s, self.backoff_first_s * 2 ** (recent - 1))


class Service:
    """A named long-running part: start()/stop(), children stopped in reverse order, supervised loops."""

    def __init__(self, name: str, *, supervisor: Supervisor | None = None) -> None:
        self.name = name
        self.supervisor = supervisor
        self.stopping = threading.Event()
        """Set by stop(); loops watch it."""
        self.__children: list[Service] = []
        self.__loops: list[tuple[str, Callable[[], None]]] = []
        self.__threads: list[threading.Thread] = []
        self.__started = False
        self.__lock = threading.RLock()  # on_start() may add loops
        # (private names mangled: subclasses keep their own _lock, _threads, ...)

    def add_child(self, child: Service) -> Service:
        """Started after on_start(), in order; stopped in reverse before on_stop(). A child with no
        supervisor of its own is supervised by this service's."""
        if child.supervisor is None:
            child.supervisor = self.supervisor
        self.__children.append(child)
        return child

    def add_loop(self, name: str, run: Callable[[], None]) -> None:
        """Run ``run`` in thread ``<service>/<name>`` from start() on (at once when already started)
        until it returns or the service is stopping; a crash is logged, and restarted under a supervisor."""
        with self.__lock:
            self.__loops.append((name, run))
            if self.__started:
                self.__spawn(name, run)

    def start(self) -> None:
        """on_start(); children start; loops start. A second start() while running does nothing.
        When a child fails to start, the children started before it stop, last first, then
        on_stop() undoes on_start(), and the error propagates; when on_start() itself raises, it
        is up to on_start() to release what it took."""
        with self.__lock:
            if self.__started:
                return
            self.stopping.clear()
            self.on_start()
            started: list[Service] = []
            try:
                for child in self.__children:
                    child.start()
                    started.append(child)
            except BaseException:
                self.stopping.set()
                for child in reversed(started):
                    child.stop()
                self.on_stop()
                raise
            for name, run in self.__loops:
                self.__spawn(name, run)
            self.__started = True

    def stop(self, timeout_s: float = 10.0) -> None:
        """stopping.set(); children stop, last first; loops are joined (``timeout_s`` in all); on_stop()."""
        with self.__lock:
            if not self.__started:
                return
            self.__started = False
            threads, self.__threads = self.__threads, []
        self.stopping.set()
        for child in reversed(self.__children):
            child.stop(timeout_s)
        deadline = time.monotonic() + timeout_s
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("%s: loop %s still running %.0f s after stop", self.name, thread.name, timeout_s)
        self.on_stop()

    def on_start(self) -> None:
        """Called by start() before the children and loops start."""

    def on_stop(self) -> None:
        """Called by stop() after the children stopped and the loops ended."""

    def wait(self, timeout_s: float | None = None) -> bool:
        """Until the service is stopping (True) or ``timeout_s`` passed (False)."""
        return self.stopping.wait(timeout_s)

    def __spawn(self, name: str, run: Callable[[], None]) -> None:
        full = f"{self.name}/{name}"
        if self.supervisor is not None:
            self.supervisor.watch(full)
        thread = threading.Thread(target=self.__run_loop, args=(full, run), name=full, daemon=True)
        self.__threads.append(thread)
        thread.start()

    def __run_loop(self, full: str, run: Callable[[], None]) -> None:
        while not self.stopping.is_set():
            try:
                run()
                return
            except Exception as exc:
                if self.stopping.is_set():
                    log.debug("%s: %s raised while stopping: %s", self.name, full, exc)
                    return
                log.exception("%s: loop %s crashed", self.name, full)
                if self.supervisor is None:
                    log.error("%s: loop %s is not supervised and stays stopped", self.name, full)
                    return
                delay = self.supervisor.crashed(full, exc)
                if delay is None or self.stopping.wait(delay):
                    return
                log.info("%s: restarting %s", self.name, full)
