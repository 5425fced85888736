"""Adapters written into vLLM's stacked LoRA tensors off the step; installs flip a mapping.

vLLM keeps one slot per adapter that a step can use (``--max-loras``) in
stacked tensors of every LoRA-wrapped module, and ``lora_index_to_id`` says
which adapter id each slot holds. Its own ``activate_adapter`` copies an
adapter into a slot inside a step: it zeroes the whole max-rank slot and walks
every module in Python while the engine waits. Here the copy happens on the
staging thread instead:

1. **reserve** a slot, under :attr:`SlotWriter.lock`: a free one, else that
   of the least recently used adapter the running batch does not use (vLLM's
   own LRU choice). A reservation id (a negative number no request can name)
   goes in ``lora_index_to_id`` and in the active set, so that vLLM's own
   activation sees the slot as taken. No request maps to it: no step reads it.
2. **write** the adapter into that slot with the layers' own ``set_lora``,
   module by module (on CUDA on a side stream, with an event the install
   waits on). ``set_lora`` clears the slot first; on this thread a linear
   layer clears only the rank rows the slot's previous adapters wrote (known
   for every slot written since the writer started: by us, or by vLLM's
   ``activate_adapter``), not all ``--max-lora-rank`` of them.
3. **flip**: the slot's entry becomes the adapter's id. Work that does not
   depend on the adapter's size. A new id flips while a step runs (the stage
   channel's install: no request of a running step maps to an id it has not
   seen); an in-place replacement of a routed id flips between two steps (the
   install RPC).

The reservation stays evictable: if a step needs more slots than are free (a
batch naming adapters vLLM loads itself), vLLM's LRU may take the reserved
slot. The write then stops at the next module (the per-slot lock makes vLLM's
own copy wait for a module copy in progress) and the install falls back to
vLLM's copy. Nothing is ever left half-written in a slot a request maps to.

``lock`` guards the manager's state: vLLM changes it only at the start of a
step (``set_active_adapters``, wrapped to take the lock) and in RPCs between
steps, the staging threads only to reserve. It is never held during a copy.
"""

from __future__ import annotations

import itertools
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.lora.layers import ClassificationHeadWithLoRA
from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

_reservation_ids = itertools.count(-(1 << 30), -1)  # negative: request ids are > 0, and -1 means "no LoRA"
_writing = threading.local()  # .rows: on a staging thread, the rank rows a slot clear must zero
_reset_lora = BaseLinearLayerWithLoRA.reset_lora


def _reset_rows(layer: BaseLinearLayerWithLoRA, index: int) -> None:
    """vLLM's clear of slot ``index``, limited to the rows a staging thread knows were
    written. Every other thread (vLLM's own copies in the step) clears the whole slot."""
    rows = getattr(_writing, "rows", None)
    if rows is None:
        _reset_lora(layer, index)
        return
    for lora_a in layer.lora_a_stacked:  # [slot, 1, rank, in]
        lora_a[index, :, :rows] = 0
    for lora_b in layer.lora_b_stacked:  # [slot, 1, out, rank]
        lora_b[index, :, :, :rows] = 0


def install_slot_reset() -> None:
    """Patch vLLM's LoRA layers' slot clear to :func:`_reset_rows` (idempotent)."""
    BaseLinearLayerWithLoRA.reset_lora = _reset_rows  # type: ignore[method-assign]


@dataclass
class DeviceSlotReservation:
    """A LoRA slot on the device, held while a staged version's weights are copied into it."""

    index: int  # the slot
    key: int  # its entry in lora_index_to_id while reserved
    lost: bool = False  # vLLM's LRU took the slot
    written: bool = False
    ahead: bool = False  # held for a version not committed yet (prepare_ahead): the first slot to give up
    event: Any = None  # CUDA: recorded after the copy; the install's stream waits on it
    lock: threading.Lock = field(default_factory=threading.Lock)  # held for one module's copy


class SlotWriter:
    def __init__(self, manager: Any):
        install_slot_reset()  # done by install_hooks already; no slot is written without it
        self.manager = manager  # LRUCacheLoRAModelManager
        self.lock = threading.RLock()
        self.reserved: dict[int, DeviceSlotReservation] = {}  # by key
        self.replaced: dict[int, DeviceSlotReservation] = {}  # by adapter id: its slot before a replacing claim
        self._internal = False  # our own changes to the active set: no eviction to react to
        self._deactivate = manager._active_adapters.deactivate_fn
        manager._active_adapters.deactivate_fn = self._on_deactivate
        self._activate = manager.activate_adapter
        manager.activate_adapter = self._on_activate
        # Slot -> rank rows its linear layers may hold (those an adapter wrote since the
        # last clear). A slot not listed is cleared whole: its history is unknown.
        self.dirty_rows: dict[int, int] = {}
        self.stream = torch.cuda.Stream() if manager.device.type == "cuda" else None
        self.writes = 0  # adapters copied into a slot off the step
        self.lost = 0  # reservations vLLM's LRU took back

    # -- on the staging thread ---------------------------------------------------------
    def reserve(self, *, ahead: bool = False) -> DeviceSlotReservation | None:
        """A free slot; else (unless ``ahead``, a slot for a version not committed yet) the slot
        held for such a version, else that of the least recently used adapter that the running
        batch does not use; None when there is none (the install then copies in the step).
        A slot held ahead is also the first that vLLM's own LRU takes for a step."""
        manager = self.manager
        with self.lock:
            index = next((i for i, held in enumerate(manager.lora_index_to_id) if held is None), None)
            if index is None and not ahead:
                index = self._take_held_ahead()
            if index is None:
                idle = None if ahead else self._least_recently_used_idle()
                if idle is None:
                    return None
                manager.deactivate_adapter(idle)  # vLLM copies it back in if a request needs it again
                index = manager.lora_index_to_id.index(None)
            reservation = DeviceSlotReservation(index, next(_reservation_ids), ahead=ahead)
            manager.lora_index_to_id[index] = reservation.key
            self._set_active(reservation.key)
            if ahead:
                self._make_least_recent(reservation.key)
            self.reserved[reservation.key] = reservation
            return reservation

    def adopt(self, reservation: DeviceSlotReservation) -> bool:
        """A slot held ahead now holds a committed version's stage: no longer given up first.
        False if it was lost meanwhile (the caller releases it and reserves again)."""
        with self.lock:
            reservation.ahead = False
            return self.claimable(reservation)

    def write(self, reservation: DeviceSlotReservation, lora: Any) -> bool:
        """Copy ``lora`` (merged, scaled) into the reserved slot; False if vLLM took it meanwhile."""
        manager, index = self.manager, reservation.index
        _writing.rows = self.dirty_rows.pop(index, None)  # unknown while half-written
        try:
            with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
                for module_name, module in manager.modules.items():
                    with reservation.lock:
                        if reservation.lost:
                            return False
                        _write_module(manager, lora, module_name, module, index)
                if self.stream is not None:
                    reservation.event = torch.cuda.Event()
                    reservation.event.record(self.stream)
        finally:
            _writing.rows = None
        with reservation.lock:
            if reservation.lost:
                return False
            reservation.written = True
            self.dirty_rows[index] = rank_rows(lora)
        self.writes += 1
        return True

    # -- installs: a flip, between steps or (a new id) while a step runs -----------------
    def claimable(self, reservation: DeviceSlotReservation | None) -> bool:
        """:meth:`claim` would flip it (call with :attr:`lock` held: only vLLM's changes,
        made under it, can take a reserved slot)."""
        return reservation is not None and reservation.written and not reservation.lost

    def claim(
        self, reservation: DeviceSlotReservation, lora_id: int, *, replace: bool, off_step: bool = False
    ) -> bool:
        """The reserved slot starts serving ``lora_id``; False if the slot was lost or never
        written (the caller copies the usual way instead). With ``replace`` the slot that
        served ``lora_id`` keeps its weights, reserved, until :meth:`commit` or :meth:`restore`.

        ``off_step``: called while a step may run (a new id, which no request of that step
        maps to). On CUDA the flip then waits for the copy itself, on this thread, instead
        of ordering it before the next kernels of the engine's stream."""
        manager = self.manager
        with self.lock:
            self.reserved.pop(reservation.key, None)
            if not self.claimable(reservation):
                self._drop(reservation)
                return False
            if reservation.event is not None:
                if off_step:
                    reservation.event.synchronize()
                else:
                    torch.cuda.current_stream().wait_event(reservation.event)
            old = manager.lora_index_to_id.index(lora_id) if lora_id in manager.lora_index_to_id else None
            self._pop_active(reservation.key)  # first: the active set never exceeds its capacity
            manager.lora_index_to_id[reservation.index] = lora_id
            if replace and old is not None:
                previous = DeviceSlotReservation(old, next(_reservation_ids), written=True)
                manager.lora_index_to_id[old] = previous.key
                self._set_active(previous.key)
                self.reserved[previous.key] = self.replaced[lora_id] = previous
            self._set_active(lora_id)
            return True

    def restore(self, lora_id: int) -> bool:
        """Undo a replacing :meth:`claim` in one flip: ``lora_id`` is served from its old slot
        again. False if there is nothing to flip back to (the caller copies instead)."""
        manager = self.manager
        with self.lock:
            previous = self.replaced.pop(lora_id, None)
            if previous is None or previous.lost:
                return False
            self.reserved.pop(previous.key, None)
            if lora_id in manager.lora_index_to_id:
                manager.lora_index_to_id[manager.lora_index_to_id.index(lora_id)] = None
            self._pop_active(previous.key)
            manager.lora_index_to_id[previous.index] = lora_id
            self._set_active(lora_id)
            return True

    def commit(self, lora_id: int) -> None:
        """The replacement stays: the replaced weights' slot is free again."""
        previous = self.replaced.pop(lora_id, None)
        if previous is not None:
            self.release(previous)

    def release(self, reservation: DeviceSlotReservation) -> None:
        """Give a reserved slot back (a cancelled or failed stage, a committed replacement).
        Its stale rows stay: whoever writes the slot next clears it first (here: off the step)."""
        with self.lock:
            self.reserved.pop(reservation.key, None)
            self._drop(reservation)

    # -- helpers (lock held) --------------------------------------------------------------
    def _take_held_ahead(self) -> int | None:
        """Free the slot of a reservation held ahead (its write stops at the next module); its index."""
        held = next((r for r in self.reserved.values() if r.ahead), None)
        if held is None:
            return None
        with held.lock:  # waits for a module copy in progress, no longer
            held.lost = True
        self.reserved.pop(held.key, None)
        self._drop(held)
        self.lost += 1
        return held.index

    def _make_least_recent(self, key: int) -> None:
        """Put ``key`` first in line for vLLM's LRU eviction (cachetools' order, which vLLM's own
        LRUCache uses); where that order is not there, it stays most recent."""
        order = getattr(self.manager._active_adapters, "_LRUCache__order", None)
        if order is not None and key in order:
            order.move_to_end(key, last=False)

    def _least_recently_used_idle(self) -> int | None:
        """An adapter in a slot that the step running now does not read: its mapping was set
        at the step's start, under the lock this thread holds."""
        manager = self.manager
        busy = adapters_the_last_step_read(manager)
        active = manager._active_adapters
        return next(
            (key for key in active.order if key > 0 and key not in busy and key not in active.pinned_items), None
        )

    def _drop(self, reservation: DeviceSlotReservation) -> None:
        manager = self.manager
        if manager.lora_index_to_id[reservation.index] == reservation.key:
            manager.lora_index_to_id[reservation.index] = None
        self._pop_active(reservation.key)

    def _set_active(self, key: int) -> None:
        self._internal = True
        try:
            self.manager._active_adapters[key] = None
        finally:
            self._internal = False

    def _pop_active(self, key: int) -> None:
        self._internal = True
        try:
            self.manager._active_adapters.pop(key, None)
        finally:
            self._internal = False

    def _on_activate(self, lora_id: int) -> bool:
        """vLLM's own copy of an adapter into a slot (in a step, or an install that copies):
        it clears the whole slot, then writes the adapter's rows."""
        try:
            activated = self._activate(lora_id)
        except BaseException:
            self.dirty_rows.clear()  # a copy stopped half-way, in a slot we cannot tell
            raise
        if activated:
            index = self.manager.lora_index_to_id.index(lora_id)
            self.dirty_rows[index] = rank_rows(self.manager._registered_adapters[lora_id])
        return activated

    def _on_deactivate(self, key: int) -> object:
        """vLLM evicts an adapter from the active set (LRU, remove, reset). For one of our
        reservations: stop its write before vLLM copies another adapter into the slot."""
        reservation = self.reserved.get(key)
        if reservation is not None and not self._internal:
            with reservation.lock:  # waits for a module copy in progress, no longer
                reservation.lost = True
            self.reserved.pop(key, None)
            self.lost += 1
            if self.stream is not None:
                torch.cuda.current_stream().wait_stream(self.stream)
        return self._deactivate(key)


def rank_rows(lora: Any) -> int:
    """The most rank rows ``lora`` writes into a slot of any linear layer."""
    rows = 0
    for weights in lora.loras.values():
        for lora_a in weights.lora_a if isinstance(weights.lora_a, list) else [weights.lora_a]:
            if lora_a is not None:
                rows = max(rows, lora_a.shape[0])
    return rows


def _write_module(manager: Any, lora: Any, module_name: str, module: Any, index: int) -> None:
    """What vLLM's ``activate_adapter`` does for one module, into slot ``index``."""
    if isinstance(module, ClassificationHeadWithLoRA):
        full = manager._get_module_to_save_weights(lora, module_name)
        if full is None:
            module.reset_module_to_save(index)
        else:
            module.set_module_to_save(index, full.weight, full.bias)
    weights = manager._get_lora_layer_weights(lora, module_name)
    if not weights:
        module.reset_lora(index)
    else:
        module.set_lora(index, weights.lora_a, weights.lora_b)


def adapters_the_last_step_read(manager: Any) -> set[int]:
    """The adapter ids the step that ran last mapped tokens or prompts to (its mapping is set at
    its start); its requests may still be running."""
    mapping = manager._last_mapping
    return set(mapping.index_mapping) | set(mapping.prompt_mapping) if mapping is not None else set()
