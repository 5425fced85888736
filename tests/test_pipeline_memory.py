"""What the pipeline keeps per version stays bounded however many versions pass.

An RL run publishes a version every step for days: the ids bound to version names, the
versions refused and the store's per-adapter locks must be let go once they are of no
use. Against the in-memory engine (``tests/support/fake_engine.py``) and a real store.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.support.fake import write_lora
from tests.support.fake_engine import FakeEngine
from vllm_lora_hotswap.pipeline import outcomes as outcomes_module
from vllm_lora_hotswap.pipeline import slots as slots_module
from vllm_lora_hotswap.pipeline.controller import SwapController
from vllm_lora_hotswap.settings import load_settings
from vllm_lora_hotswap.store import CheckpointStore
from vllm_lora_hotswap.store import publish as publish_module


@pytest.fixture
def setup(tmp_path: Path) -> tuple[CheckpointStore, Path]:
    """A real store, and a small PEFT LoRA to publish into it."""
    return CheckpointStore(tmp_path), write_lora(tmp_path.parent / f"{tmp_path.name}-lora", hidden=32, layers=1)


def _controller(store: CheckpointStore, engine: FakeEngine) -> SwapController:
    settings = load_settings(root=store.root, events=False, poll_interval=3600, retire_grace=0)
    return SwapController(store, engine, settings, "test-instance")


def _bound_ids(controller: SwapController) -> int:
    return len(controller.slots._ids) + len(controller.slots._released_ids)


def test_a_retired_version_keeps_its_id_for_the_grace_and_then_lets_it_go(
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, lora = setup
    engine = FakeEngine()
    controller = _controller(store, engine)
    v1 = store.publish("a", lora)
    controller.sync_once()
    first_id = controller.current("a").lora_id
    store.publish("a", lora)
    controller.sync_once()
    controller.sync_once()  # housekeeping: v1 is idle past retire_grace (0) and leaves its slot
    assert v1 not in controller.status().adapters["a"].installed_versions

    # A request pinning v1 within the grace runs under v1's old id: one name, one id.
    assert controller.ensure("a", v1).lora_id == first_id
    controller.sync_once()  # retired again
    assert v1 not in controller.status().adapters["a"].installed_versions

    monkeypatch.setattr(slots_module, "ID_GRACE", 0.0)
    controller.sync_once()  # past the grace: the id is let go
    assert _bound_ids(controller) == 1, "only the current version's id is still bound"
    assert controller.ensure("a", v1).lora_id != first_id


def test_ids_and_refusals_stay_bounded_over_many_versions(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    store, lora = setup
    monkeypatch.setattr(slots_module, "ID_GRACE", 0.0)
    monkeypatch.setattr(outcomes_module, "REMEMBERED_FAILURES", 8)
    engine = FakeEngine()
    controller = _controller(store, engine)
    for n in range(40):
        version = store.publish("a", lora)
        if n % 2:  # every other version is refused at staging
            engine.reject["stage"].add(str(store.version_dir("a", version)))
        controller.sync_once()
        controller.sync_once()  # housekeeping: the replaced version leaves
        assert _bound_ids(controller) <= 2
    refused = controller.slots.state("a").failed
    assert len(refused) == 8 and max(refused) == version, "the newest refusals are the ones remembered"
    assert controller.status().adapters["a"].served_version == store.versions("a")[-2]


def test_the_stores_per_adapter_thread_locks_are_let_go(setup) -> None:
    store, lora = setup

    def publish(adapter: str) -> None:
        for _ in range(3):
            store.publish(adapter, lora)

    threads = [threading.Thread(target=publish, args=(f"a{i % 4}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(store.versions("a0")) == 6
    assert publish_module._thread_locks == {}
