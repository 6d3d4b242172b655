"""RolloutManager's writes to the registry: the API thread and the tick loop save one rollout at
once without two INSERTs of its id, and every save leaves the latest state in the database."""

from __future__ import annotations

import threading
from pathlib import Path

from central.registry import Registry
from central.rollout_machine import Plan, Rollout
from central.rollouts import RolloutManager
from models.package.signing import builtin_trusted_keys
from stream.mqtt import MqttClient, MqttSettings


class WatchedRegistry(Registry):
    """A real SQLite registry that records how many ``save_rollout`` calls overlap. The first call
    waits (up to a deadline) for a second one to enter, so an unguarded race always shows."""

    def __init__(self, url: str, storage: Path) -> None:
        super().__init__(url, storage, builtin_trusted_keys())
        self.inside = 0
        self.most_inside = 0
        self.second_entered = threading.Event()
        self._count = threading.Lock()

    def save_rollout(self, rollout_id: str, model: str, state: dict) -> None:
        with self._count:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            first = self.inside == 1
            if not first:
                self.second_entered.set()
        if first:
            self.second_entered.wait(1.0)
        try:
            super().save_rollout(rollout_id, model, state)
        finally:
            with self._count:
                self.inside -= 1


def test_two_threads_saving_a_new_rollout_write_it_once_and_in_order(tmp_path: Path) -> None:
    registry = WatchedRegistry(f"sqlite:///{tmp_path / 'central.db'}", tmp_path / "store")
    manager = RolloutManager("plant", registry, MqttClient(MqttSettings(), "central-plant"), "http://127.0.0.1:8080")
    rollout = Rollout(Plan("seg-2", "seg-1", ("m1", "m2")))
    manager.rollouts["r1"], manager.models["r1"] = rollout, "seg"
    rollout.start(0.0)
    failures: list[BaseException] = []

    def save() -> None:
        try:
            manager._save("r1")
        except BaseException as exc:  # noqa: BLE001 - the thread's error is the test's result
            failures.append(exc)

    threads = [threading.Thread(target=save) for _ in range(2)]
    threads[0].start()
    while registry.inside == 0 and threads[0].is_alive():
        threading.Event().wait(0.01)
    threads[1].start()
    for thread in threads:
        thread.join(10)

    assert failures == [] and registry.most_inside == 1
    rollout.pause(1.0)
    manager._save("r1")
    [(rollout_id, model, state)] = registry.rollouts()
    assert (rollout_id, model, state["paused"]) == ("r1", "seg", True)
