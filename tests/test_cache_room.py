"""Room in vLLM's adapter cache for our pinned adapters, beside the ones vLLM loads itself
(:mod:`vllm_lora_hotswap.engine.cache_room`), against vLLM's own LRU cache and manager.

No engine runs: the manager is vLLM's class with the state a worker's has (as in
``test_device_slots``); vLLM's own load is its ``add_adapter``'s eviction step.
"""

from __future__ import annotations

import pytest
from vllm.lora.layers import LoRAMapping

from tests.test_device_slots import make_lora, make_manager, register
from vllm_lora_hotswap.engine.cache_room import CacheRoom

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def vllm_loads(manager, lora) -> None:
    """What vLLM does at a step's start for an adapter of its own that is not cached
    (``LRUCacheWorkerLoRAManager.add_adapter``): evict its least recently used unpinned one."""
    if len(manager) + 1 > manager.capacity:
        manager.remove_oldest_adapter()
    register(manager, lora)


def pin_ours(manager, lora) -> None:
    register(manager, lora)
    manager._registered_adapters.pin(lora.id)


def test_a_full_cache_evicts_the_least_recently_used_adapter_of_vllms_that_the_last_step_did_not_read() -> None:
    manager = make_manager(cpu=4)
    room = CacheRoom(manager)
    pin_ours(manager, make_lora(1, 1.0))
    for key in (11, 12, 13):
        vllm_loads(manager, make_lora(key, 2.0))  # 11 is the least recently used
    manager._last_mapping = LoRAMapping(index_mapping=(11, 11, 0), prompt_mapping=(11,))  # a request on 11 runs

    assert room.make_room({1}, off_step=True) == {
        "ok": False,
        "in_step": True,
        "error": "vLLM's adapter cache is full: evicted in the step",
    }  # off the step a step may be running: nothing is evicted there
    assert sorted(manager.list_adapters()) == [1, 11, 12, 13]
    assert room.make_room({1}, off_step=False) is None
    assert sorted(manager.list_adapters()) == [1, 11, 13]  # 12: the oldest that no request reads


def test_a_full_cache_whose_unpinned_adapters_all_run_makes_the_version_wait() -> None:
    manager = make_manager(cpu=3)
    room = CacheRoom(manager)
    pin_ours(manager, make_lora(1, 1.0))
    vllm_loads(manager, make_lora(11, 2.0))
    vllm_loads(manager, make_lora(12, 2.0))
    manager._last_mapping = LoRAMapping(index_mapping=(11, 12), prompt_mapping=(11, 12))
    answer = room.make_room({1}, off_step=False)
    assert answer is not None and answer["capacity"] and "--max-cpu-loras" in answer["error"]
    assert sorted(manager.list_adapters()) == [1, 11, 12]


def test_once_vllm_loads_adapters_of_its_own_ours_leave_it_one_entry_so_its_next_load_finds_one_to_evict() -> None:
    manager = make_manager(cpu=3)
    room = CacheRoom(manager)
    room.vllm_loads_its_own = False  # whatever this process's environment says
    ours = {1, 2, 3}
    vllm_loads(manager, make_lora(11, 2.0))
    assert room.make_room(ours, off_step=False) is None  # 11 seen: vLLM loads adapters of its own
    pin_ours(manager, make_lora(1, 1.0))
    assert room.make_room(ours, off_step=False) is None
    pin_ours(manager, make_lora(2, 1.0))
    answer = room.make_room(ours, off_step=False)  # a third of ours would pin the last entry
    assert (
        answer is not None
        and answer["capacity"]
        and "less 1 kept for the adapters vLLM loads itself" in answer["error"]
    )
    vllm_loads(manager, make_lora(12, 2.0))  # evicts 11: never "All items are pinned"
    vllm_loads(manager, make_lora(13, 2.0))
    assert sorted(manager.list_adapters()) == [1, 2, 13]


def test_without_adapters_of_vllms_own_ours_may_fill_the_cache() -> None:
    manager = make_manager(cpu=2)
    room = CacheRoom(manager)
    room.vllm_loads_its_own = False
    for key in (1, 2):
        assert room.make_room({1, 2}, off_step=False) is None
        pin_ours(manager, make_lora(key, 1.0))
    answer = room.make_room({1, 2, 3}, off_step=False)
    assert answer is not None and answer["error"] == "all 2 LoRA slots (--max-cpu-loras 2) are in use"
