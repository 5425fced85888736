"""Who holds the engine's LoRA slots: every adapter's installed versions, their
ids, the slots transactions have reserved, which versions are idle, and when
they may leave.

The engine has ``--max-cpu-loras`` host slots. A new version takes a free
slot, else the oldest idle version with no request in flight gives up its
slot, else (for an adapter that already serves a version) the new version
replaces the current one in place. An adapter that finds no slot at all waits
until some version leaves, instead of re-reading its files at every poll.

Pure state: nothing here calls the engine or reads the store, so the
controller can hold its lock around any of it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from ..settings import HotSwapSettings
from ..store import SwapRecord
from .engine_api import EngineLimits, LoraHandle, NoCapacity

logger = logging.getLogger("vllm.lora_hotswap")
# How long the id of a version that left its slot (or never got one) stays bound to
# its name: a request that took its route just before retirement has long reached the
# engine. After that the id is forgotten, so the table does not grow with versions seen.
ID_GRACE = 600.0


class VersionBusy(Exception):
    """A version's LoRA name still has requests in flight under an older slot id."""


class EvictionNeeded(Exception):
    """Every slot is taken; one of ``candidates`` (idle, oldest first) may be retired."""

    def __init__(self, candidates: list[LoraHandle]):
        super().__init__(f"{len(candidates)} idle versions to evict")
        self.candidates = candidates


@dataclass
class AdapterState:
    current: LoraHandle | None = None
    installed: dict[str, LoraHandle] = field(default_factory=dict)  # version -> handle
    idle_since: dict[str, float] = field(default_factory=dict)  # non-current versions
    failed: dict[str, str] = field(default_factory=dict)  # version -> reason, not retried
    nbytes: dict[str, int] = field(default_factory=dict)  # staged host bytes per installed version
    state: str = "waiting"
    phase: str | None = None  # the step a transaction of this adapter is in
    last_swap: SwapRecord | None = None
    last_error: str | None = None


@dataclass(frozen=True)
class VersionReservation:
    """A version's place in the slot table, held while its transaction installs it."""

    handle: LoraHandle
    replace: LoraHandle | None  # in place: the installed version whose slot ``handle`` takes
    new_id: bool  # ``handle.lora_id`` was bound to its name just now


class SlotTable:
    def __init__(self, limits: EngineLimits, settings: HotSwapSettings):
        self.limits = limits
        self.settings = settings
        self.adapters: dict[str, AdapterState] = {}
        # An id, once bound to a name, stays bound while the version may have requests
        # (two ids under one name kill a 0.32 engine): while it is reserved or installed,
        # and for ID_GRACE seconds after (``_released_ids``, with the time it left).
        self._ids: dict[tuple[str, str], int] = {}
        self._released_ids: dict[tuple[str, str], tuple[int, float]] = {}
        self._reserved: dict[tuple[str, str], LoraHandle] = {}  # new slots held by transactions
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
    def reserve(
        self, adapter: str, version: str, path: str, new_lora_id, *, make_current: bool, evict: bool
    ) -> VersionReservation:
        """A slot for ``adapter@version``: a free one, or the current version's (in place).

        Raises :class:`EvictionNeeded` (when ``evict``) if only retiring an idle version
        would free one, and :class:`NoCapacity` when nothing can.
        """
        state = self.state(adapter)
        in_place = make_current and state.current is not None
        if not (in_place and self.settings.mode == "inplace"):
            if self.installed_count + len(self._reserved) < self.limits.cpu_loras_for_versions:
                return self._new_slot(adapter, version, path, new_lora_id, make_current)
            idle = self.idle_versions()
            if evict and idle:
                raise EvictionNeeded(idle)
            if not in_place:
                raise NoCapacity(self.limits.no_capacity())
            logger.warning(
                "hot-swap: %s: no spare LoRA slot for a versioned swap; swapping %s in place "
                "(raise --max-cpu-loras to keep versioned semantics)",
                adapter,
                version,
            )
        replace = state.current
        assert replace is not None
        # In-place mode serves the current weights under the adapter's own name (one
        # slot id for all its versions); every other version has a name of its own.
        name = adapter if self.settings.mode == "inplace" else f"{adapter}@{version}"
        return VersionReservation(LoraHandle(adapter, version, replace.lora_id, name, path), replace, new_id=False)

    def _new_slot(self, adapter: str, version: str, path: str, new_lora_id, make_current: bool) -> VersionReservation:
        name = adapter if self.settings.mode == "inplace" and make_current else f"{adapter}@{version}"
        key = (adapter, version)
        lora_id = self._ids.get(key)
        if lora_id is None and key in self._released_ids:
            lora_id = self._ids[key] = self._released_ids.pop(key)[0]
        new_id = lora_id is None
        if lora_id is None:
            lora_id = self._ids[key] = new_lora_id()
        handle = LoraHandle(adapter, version, lora_id, name, path)
        self._reserved[(adapter, version)] = handle
        return VersionReservation(handle, None, new_id)

    def release(self, reservation: VersionReservation) -> None:
        """Give back a slot a transaction reserved and did not install into."""
        handle = reservation.handle
        if self._reserved.pop((handle.adapter, handle.version), None) is not None:
            self._release_id(handle.adapter, handle.version)
            self._slot_freed()

    def idle_versions(self) -> list[LoraHandle]:
        """Installed versions that serve no name of their own any more, oldest idle first."""
        idle = sorted(
            (since, adapter, version)
            for adapter, s in self.adapters.items()
            for version, since in s.idle_since.items()
        )
        return [self.adapters[adapter].installed[version] for _, adapter, version in idle]

    def installed(self, reservation: VersionReservation, nbytes: int, *, make_current: bool) -> LoraHandle | None:
        """The transaction switched to its version: it holds the slot now. Returns the
        version it displaced as current (to be routed no more under the bare name)."""
        handle, replace = reservation.handle, reservation.replace
        state = self.state(handle.adapter)
        self._reserved.pop((handle.adapter, handle.version), None)
        if replace is not None:
            self._ids.pop((handle.adapter, replace.version), None)  # that id no longer holds the old weights
            self._released_ids.pop((handle.adapter, replace.version), None)
            self._ids[(handle.adapter, handle.version)] = handle.lora_id
            state.installed.pop(replace.version, None)
            state.nbytes.pop(replace.version, None)
            state.idle_since.pop(replace.version, None)
        state.installed[handle.version] = handle
        state.nbytes[handle.version] = nbytes
        return self.switched(handle, make_current=make_current, replaced=replace)

    def switched(
        self, handle: LoraHandle, *, make_current: bool, replaced: LoraHandle | None = None
    ) -> LoraHandle | None:
        state = self.state(handle.adapter)
        if not make_current:
            state.idle_since[handle.version] = time.monotonic()
            return None
        state.idle_since.pop(handle.version, None)
        previous, state.current = state.current, handle
        if previous is not None and previous.version != handle.version and replaced is None:
            state.idle_since[previous.version] = time.monotonic()
        return previous

    def touch(self, adapter: str, version: str) -> None:
        """A request named a non-current version: restart its idle clock."""
        state = self.adapters.get(adapter)
        if state is not None and version in state.idle_since:
            state.idle_since[version] = time.monotonic()

    # -- waiting for a slot ------------------------------------------------------------
    def wait_for_slot(self, adapter: str) -> None:
        """``adapter`` found no slot: try it again when a version leaves."""
        self._waiting.add(adapter)

    def take_waiting(self) -> set[str]:
        """Adapters that waited for a slot, once one has freed since (then forgotten)."""
        if not self._freed:
            return set()
        waiting, self._waiting, self._freed = self._waiting, set(), False
        return waiting

    def _slot_freed(self) -> None:
        self._freed = self._freed or bool(self._waiting)

    # -- giving slots back -------------------------------------------------------------
    def due_for_retirement(self) -> list[LoraHandle]:
        """Idle versions whose ``retire_grace`` has passed (in-flight requests not yet checked)."""
        now = time.monotonic()
        return [
            state.installed[version]
            for state in self.adapters.values()
            for version, since in state.idle_since.items()
            if now - since >= self.settings.retire_grace
        ]

    def take_for_retirement(self, handle: LoraHandle, *, min_idle: float) -> bool:
        """Forget ``handle`` if it is still installed and idle for ``min_idle`` seconds
        (a request may have touched it meanwhile); the caller then frees its slot."""
        state = self.adapters.get(handle.adapter)
        since = state.idle_since.get(handle.version) if state else None
        if since is None or state.installed.get(handle.version) != handle or time.monotonic() - since < min_idle:
            return False
        del state.installed[handle.version], state.idle_since[handle.version]
        state.nbytes.pop(handle.version, None)
        self._release_id(handle.adapter, handle.version)
        self._slot_freed()
        return True

    # -- ids of versions that left -----------------------------------------------------
    def _release_id(self, adapter: str, version: str) -> None:
        lora_id = self._ids.pop((adapter, version), None)
        if lora_id is not None:
            self._released_ids[(adapter, version)] = (lora_id, time.monotonic())

    def forget_released_ids(self) -> int:
        """Unbind the ids of versions that left ``ID_GRACE`` seconds ago or more; how many."""
        now = time.monotonic()
        old = [key for key, (_, since) in self._released_ids.items() if now - since >= ID_GRACE]
        for key in old:
            del self._released_ids[key]
        return len(old)
