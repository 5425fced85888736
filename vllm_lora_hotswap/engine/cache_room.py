"""Room for our adapters in vLLM's adapter cache, which the adapters vLLM loads itself share.

Why: vLLM keeps up to ``--max-cpu-loras`` adapters registered in one LRU cache.
Ours are pinned there while installed. vLLM's own (``--lora-modules``,
``POST /v1/load_lora_adapter``) are not, and ``/v1/unload_lora_adapter`` only
forgets the name: the adapter stays cached, so TRL's AsyncGRPO path, which loads
one per step, fills the cache with them. vLLM loads one of its own at a step's
start by evicting its least recently used unpinned adapter, and raises (its
engine dies) when every cached adapter is pinned.

How: an install of one more adapter of ours asks :meth:`CacheRoom.make_room`
first, under the slot lock that a step's start also takes:

* once vLLM may load adapters of its own (its runtime LoRA routes are on, or
  one was seen in the cache), ours leave one entry unpinned, so that vLLM's
  next load always finds an adapter to evict;
* a full cache makes room as vLLM's own loads do, by evicting the least
  recently used of vLLM's adapters, but never one the last step read: its
  requests may still run (on a GPU with async scheduling its kernels may still
  read that slot), and evicting it would only have vLLM load it again;
* an install off the step (on the stage channel, while a step may run) evicts
  nothing: it is answered ``in_step`` and comes again by RPC between two steps.

Otherwise the install answers ``capacity``: the version waits for a slot and
says why.
"""

from __future__ import annotations

import os
from collections.abc import Container
from typing import Any

from ..pipeline.engine_api import no_capacity_message
from .device_slots import adapters_the_last_step_read

RUNTIME_LORA_UPDATING = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"  # vLLM's switch for its LoRA load routes


def runtime_lora_updating() -> bool:
    """Whether vLLM's ``/v1/load_lora_adapter`` is on (parsed as vLLM parses it)."""
    return os.environ.get(RUNTIME_LORA_UPDATING, "0").strip().lower() in {"1", "true"}


class CacheRoom:
    """Room for one more pinned adapter of ours in a worker's vLLM LoRA cache.

    Example: ``CacheRoom(manager).make_room(installed_ids, off_step=False)`` is None when
    the install may register and pin its adapter, else the install's answer.
    """

    def __init__(self, manager: Any):  # vLLM's LRUCacheLoRAModelManager
        self.manager = manager
        self.vllm_loads_its_own = runtime_lora_updating()  # or once one of its adapters is seen

    def make_room(self, ours: Container[int], *, off_step: bool) -> dict[str, Any] | None:
        manager = self.manager
        cache = manager._registered_adapters
        self.vllm_loads_its_own = self.vllm_loads_its_own or any(key not in ours for key in cache)
        if self.vllm_loads_its_own and len(cache.pinned_items) + 1 >= manager.capacity:
            return _capacity(no_capacity_message(manager.capacity, kept_for_vllm=1))
        if len(manager) < manager.capacity:
            return None
        if off_step:
            return {"ok": False, "in_step": True, "error": "vLLM's adapter cache is full: evicted in the step"}
        if evict_idle(manager):
            return None
        return _capacity(no_capacity_message(manager.capacity))


def evict_idle(manager: Any) -> bool:
    """Remove the least recently used adapter of vLLM's cache that is neither pinned nor read by
    the last step (``_last_mapping``, set at its start); False when there is none."""
    cache = manager._registered_adapters
    busy = adapters_the_last_step_read(manager)
    key = next((key for key in cache.order if key not in cache.pinned_items and key not in busy), None)
    return key is not None and bool(manager.remove_adapter(key))


def _capacity(error: str) -> dict[str, Any]:
    return {"ok": False, "capacity": True, "error": error}
