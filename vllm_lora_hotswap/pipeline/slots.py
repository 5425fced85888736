"""Who holds the engine's LoRA slots: every adapter's installed versions, their
ids, which of them are idle, and when they leave.

The engine has ``--max-cpu-loras`` host slots. A new version takes a free
slot, else the oldest idle version with no request in flight gives up its
slot, else (for an adapter that already serves a version) the new version
replaces the current one in place. An adapter that finds no slot at all waits
in ``waiting`` until some version leaves, instead of re-reading its files at
every poll.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from ..settings import HotSwapSettings
from ..store import SwapRecord
from .engine_api import EngineAdapter, EngineLimits, LoraHandle, NoCapacity

logger = logging.getLogger("vllm.lora_hotswap")


class VersionBusy(Exception):
    """A version's LoRA name still has requests in flight under an older slot id."""


@dataclass
class AdapterState:
    current: LoraHandle | None = None
    installed: dict[str, LoraHandle] = field(default_factory=dict)  # version -> handle
    idle_since: dict[str, float] = field(default_factory=dict)  # non-current versions
    failed: dict[str, str] = field(default_factory=dict)  # version -> reason, not retried
    nbytes: dict[str, int] = field(default_factory=dict)  # staged host bytes per installed version
    state: str = "waiting"
    last_swap: SwapRecord | None = None
    last_error: str | None = None


class SlotTable:
    def __init__(self, engine: EngineAdapter, limits: EngineLimits, settings: HotSwapSettings):
        self.engine = engine
        self.limits = limits
        self.settings = settings
        self.adapters: dict[str, AdapterState] = {}
        # An id, once bound to a name, stays bound for the life of the process:
        # two ids under one name kill a 0.32 engine.
        self._ids: dict[tuple[str, str], int] = {}
        self._waiting: set[str] = set()
        self._freed = False

    def state(self, adapter: str) -> AdapterState:
        return self.adapters.setdefault(adapter, AdapterState())

    @property
    def installed_count(self) -> int:
        return sum(len(s.installed) for s in self.adapters.values())

    @property
    def installed_bytes(self) -> int:
        return sum(sum(s.nbytes.values()) for s in self.adapters.values())

    @property
    def has_idle(self) -> bool:
        return any(s.idle_since for s in self.adapters.values())

    # -- taking a slot -----------------------------------------------------------------
    def slot_for(self, adapter: str, version: str, *, make_current: bool) -> LoraHandle | None:
        """None: the new version gets a slot of its own; else the installed version it
        replaces in place. Raises :class:`NoCapacity` when neither is possible."""
        state = self.state(adapter)
        if make_current and state.current is not None and self.settings.mode == "inplace":
            return state.current
        if self.installed_count < self.limits.max_cpu_loras or self._evict_one_idle():
            return None
        if not (make_current and state.current is not None):
            raise NoCapacity(f"all {self.limits.max_cpu_loras} LoRA slots (--max-cpu-loras) are in use")
        logger.warning(
            "hot-swap: %s: no spare LoRA slot for a versioned swap; swapping %s in place "
            "(raise --max-cpu-loras to keep versioned semantics)", adapter, version,
        )  # fmt: skip
        return state.current

    def handle_for(self, adapter: str, version: str, path: str, replace: LoraHandle | None, current: bool) -> LoraHandle:
        # In-place mode serves the current weights under the adapter's own name (one
        # slot id for all its versions); every other version has a name of its own.
        name = adapter if self.settings.mode == "inplace" and current else f"{adapter}@{version}"
        if replace is not None:
            self._ids.pop((adapter, replace.version), None)  # that id no longer holds the old weights
            self._ids[(adapter, version)] = replace.lora_id
            return LoraHandle(adapter, version, replace.lora_id, name, path)
        lora_id = self._ids.get((adapter, version))
        if lora_id is None:
            if self.engine.in_flight(LoraHandle(adapter, version, 0, name, path)):
                raise VersionBusy(f"requests for {name} under an older slot are still running")
            lora_id = self._ids[(adapter, version)] = self.engine.new_lora_id()
        return LoraHandle(adapter, version, lora_id, name, path)

    def wait_for_slot(self, adapter: str) -> None:
        """``adapter`` found no slot: try it again when a version leaves."""
        self._waiting.add(adapter)

    def take_waiting(self) -> set[str]:
        """Adapters that waited for a slot, once one has freed since (then forgotten)."""
        if not self._freed:
            return set()
        waiting, self._waiting, self._freed = self._waiting, set(), False
        return waiting

    @property
    def slot_freed(self) -> bool:
        return self._freed

    # -- giving slots back -------------------------------------------------------------
    def _evict_one_idle(self) -> bool:
        candidates = sorted(
            (since, adapter, version) for adapter, s in self.adapters.items() for version, since in s.idle_since.items()
        )
        for _, adapter, version in candidates:
            if self.engine.in_flight(self.adapters[adapter].installed[version]) == 0:
                self.remove_version(adapter, version)
                return True
        return False

    def retire_idle(self) -> bool:
        """Remove idle versions past ``retire_grace`` with no request in flight; True if any left."""
        retired = False
        now = time.monotonic()
        for adapter, state in self.adapters.items():
            for version, since in list(state.idle_since.items()):
                if now - since >= self.settings.retire_grace and self.engine.in_flight(state.installed[version]) == 0:
                    self.remove_version(adapter, version)
                    retired = True
        return retired

    def remove_version(self, adapter: str, version: str) -> None:
        state = self.adapters[adapter]
        handle = state.installed.pop(version)
        state.idle_since.pop(version, None)
        state.nbytes.pop(version, None)
        self.engine.unroute(adapter, version)
        self.engine.remove(handle)
        self._freed = bool(self._waiting)
        logger.info("hotswap retired adapter=%s version=%s", adapter, version)
