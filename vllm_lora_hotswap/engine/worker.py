"""Worker-side half of a swap: stage off the engine loop, install between steps.

Runs in every vLLM worker process (each tensor-parallel rank). Staging starts
when the API server's message reaches the worker's :mod:`.stage_channel`
socket (or, without one, the ``hotswap_stage`` RPC): a thread reads the
weights once (:mod:`.single_read`: hashed against READY from the same bytes
vLLM's loader builds the adapter from), checks them, and writes them into a free LoRA slot
(:mod:`.device_slots`), all while the engine runs; it reports back on the
channel. After a publisher's written notice that work is mostly done before the
commit: the read ahead built the adapter into a free slot (:mod:`.prepare_ahead`)
and staging adopts it once ``READY`` matches both files it was built from. The install of a new slot id comes on the channel too and only
flips the slot's mapping, also while the engine runs: no request maps to
that id before the install answers. The other methods (and installs that
need more than a flip) reach the worker through ``collective_rpc("hotswap_*")``,
which the engine core executes between two model steps on every rank at
once. The LoRA manager is not thread-safe: every change to its state (vLLM's
at the start of a step, ours) is made under :attr:`SlotWriter.lock`.

Staged adapters stay in host memory for as long as they are installed, and
``WorkerLoRAManager._load_adapter`` is patched to return them: whenever vLLM
would lazily re-read an adapter from disk inside a step (LRU eviction, the
``reset_lora_state`` that ends a base-weight update), it gets the staged copy
instead, so no step ever reads the store.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vllm.lora.request import LoRARequest
from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager, WorkerLoRAManager

from ..store.checkpoint import READY_FILE
from ..store.records import STAGE_PHASES
from . import single_read
from .adapter_checks import checked_for_slots
from .cache_room import CacheRoom
from .device_slots import DeviceSlotReservation, SlotWriter
from .prepare_ahead import AdapterPreparer, PreparedAdapter
from .read_ahead import READS_AHEAD
from .single_read import SingleRead
from .stage_channel import WorkerChannel

logger = logging.getLogger("vllm.lora_hotswap")
_original_load_adapter = WorkerLoRAManager._load_adapter
_by_manager: weakref.WeakKeyDictionary[Any, WorkerHotSwap] = weakref.WeakKeyDictionary()


def _load_adapter(manager: WorkerLoRAManager, lora_request: LoRARequest):
    hotswap = _by_manager.get(manager)
    if hotswap is not None:
        entry = hotswap.installed.get(lora_request.lora_int_id)
        if entry is not None and entry.lora is not None:
            return entry.lora
        # vLLM's own adapters (--lora-modules, /v1/load_lora_adapter) are its business; a version
        # directory of the store (it has READY) read here is ours, read without its hash check.
        if os.path.isfile(os.path.join(lora_request.lora_path, READY_FILE)):
            hotswap.disk_loads += 1  # counted: it should stay 0
            logger.warning(
                "hot-swap: vLLM loads %s from the store inside a step (not staged here): read without the "
                "staging hash check",
                lora_request.lora_name,
            )
    return _original_load_adapter(manager, lora_request)


def _under_slot_lock(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def locked(manager: WorkerLoRAManager, *args: Any, **kwargs: Any) -> Any:
        hotswap = _by_manager.get(manager)
        if hotswap is None:
            return method(manager, *args, **kwargs)
        with hotswap.slots.lock:
            return method(manager, *args, **kwargs)

    return locked


def install_lora_manager_hooks() -> None:
    """Patch vLLM's worker LoRA manager (idempotent): a staged version is served from memory
    instead of being read from the store inside a step, and everything through which vLLM
    changes the manager's state (the start of each step, its add/remove/pin RPCs, the reset
    after a base-weight update) takes the lock that a staging thread holds to reserve a slot."""
    if WorkerLoRAManager._load_adapter is _load_adapter:
        return
    WorkerLoRAManager._load_adapter = _load_adapter  # type: ignore[method-assign]
    for name in ("set_active_adapters", "add_adapter", "remove_adapter", "pin_adapter", "remove_all_adapters"):
        setattr(LRUCacheWorkerLoRAManager, name, _under_slot_lock(getattr(LRUCacheWorkerLoRAManager, name)))


@dataclass
class _Staged:
    lora_id: int
    name: str
    path: str
    state: str = "pending"  # pending | ready | failed
    error: str | None = None
    lora: Any = None  # vllm LoRAModel, merged and scaled, ready for set_lora copies
    nbytes: int = 0
    cancelled: bool = False
    slot: DeviceSlotReservation | None = None  # the device slot it was written into (None: the install copies)
    timings: dict[str, float] = field(default_factory=dict)  # STAGE_PHASES -> seconds, once ready

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "error": self.error, "nbytes": self.nbytes, "timings": self.timings}


class WorkerHotSwap:
    """Per-worker state: adapters being staged, adapters installed (by slot id)."""

    def __init__(self, worker: Any):
        self.worker_manager = worker.model_runner.lora_manager
        if self.worker_manager is None:
            raise RuntimeError("vllm-lora-hotswap needs --enable-lora")
        self.staging: dict[tuple[int, str], _Staged] = {}
        self.installed: dict[int, _Staged] = {}
        self.previous: dict[int, _Staged | None] = {}  # in-place installs, kept for restore
        self.disk_loads = 0  # adapters vLLM loaded from disk inside a step instead of from us
        self.step_copies = 0  # installs that copied into a slot in the step (no free slot was staged)
        self.single_reads = 0  # stages whose weights vLLM built from the one read that was hashed
        self._lock = threading.Lock()  # guards staging and the entries' states
        self.slots = SlotWriter(self.manager)
        self.preparer = AdapterPreparer(
            functools.partial(_original_load_adapter, self.worker_manager),
            lambda lora: checked_for_slots(self.manager, lora),
            self.slots,
        )
        self.prepared_ahead = 0  # stages that adopted an adapter built and put in a slot ahead of its commit
        self.cache_room = CacheRoom(self.manager)
        _by_manager[self.worker_manager] = self
        self.channel: WorkerChannel | None = None
        parallel = worker.vllm_config.parallel_config
        self.label = f"{parallel.data_parallel_rank}-{worker.rank}"

    def open_channel(self, directory: str) -> str | None:
        """Bind this worker's end of the API server's stage channel; its socket path (None: RPCs only)."""
        try:
            if self.channel is None or str(self.channel.path.parent) != directory:
                # Without vLLM's loader fed from memory, staging reads the file itself: no read ahead.
                read_ahead = (
                    functools.partial(READS_AHEAD.start, prepare=self.preparer) if single_read.INSTALLED else None
                )
                self.channel = WorkerChannel(directory, self.label, self.stage, self.install_off_step, read_ahead)
        except OSError as exc:
            logger.warning("hot-swap: worker %s cannot bind the stage channel (%s); staging by RPC", self.label, exc)
            return None
        return str(self.channel.path)

    @property
    def manager(self) -> Any:  # LRUCacheLoRAModelManager
        return self.worker_manager._adapter_manager

    # -- staging (returns at once; a thread does the work) -----------------------------
    def stage(self, lora_id: int, name: str, path: str) -> None:
        with self._lock:
            existing = self.staging.get((lora_id, path))
            if existing is None or existing.state == "failed":
                entry = self.staging[(lora_id, path)] = _Staged(lora_id, name, path)
        if existing is not None and existing.state != "failed":
            if existing.state == "ready" and self.channel is not None:  # asked again: answer again
                self.channel.report(lora_id, path, existing.status())
            return
        threading.Thread(target=self._stage, args=(entry,), name=f"hotswap-stage-{lora_id}", daemon=True).start()

    def _stage(self, entry: _Staged) -> None:
        slot = None
        read = SingleRead(entry.path)
        marks = [time.perf_counter()]  # the end of each of STAGE_PHASES, after the start
        try:
            request = LoRARequest(lora_name=entry.name, lora_int_id=entry.lora_id, lora_path=entry.path)
            # vLLM's own loader: rank vs --max-lora-rank, bias, target modules the model has;
            # it builds the adapter from the one read of the weight file, hashed first.
            with read:
                marks.append(time.perf_counter())
                prepared = read.prepared  # built (and written into a slot) from the bytes read ahead
                lora = (
                    prepared.adopt(entry.lora_id) if prepared else _original_load_adapter(self.worker_manager, request)
                )
            marks.append(time.perf_counter())
            self.single_reads += read.from_memory
            self.prepared_ahead += prepared is not None
            nbytes = prepared.nbytes if prepared else checked_for_slots(self.manager, lora)
            read.verify()  # the bytes it was built from are the ones READY hashed: only then a slot
            marks.append(time.perf_counter())
            slot = self._slot_of(prepared)
            if slot is None:
                slot = self.slots.reserve()
                if slot is not None and not self.slots.write(slot, lora):
                    slot = None  # vLLM needed the slot meanwhile: the install copies in the step
            marks.append(time.perf_counter())
            entry.timings = {phase: end - start for phase, start, end in zip(STAGE_PHASES, marks, marks[1:])}
            if prepared:
                entry.timings["built_ahead"] = prepared.seconds  # off the critical path, before the stage
        except BaseException as exc:  # noqa: BLE001 - reported to the controller, never raised here
            if slot is not None:
                self.slots.release(slot)
            if read.prepared is not None:
                read.prepared.discard()  # its slot, unless it was taken above
            error: BaseException = exc
            try:
                read.verify()  # a torn or replaced file explains any failure best
            except Exception as mismatch:  # noqa: BLE001 - reported instead
                error = mismatch
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            self._finish(entry, error=f"{type(error).__name__}: {message}")
            return
        self._finish(entry, lora=lora, nbytes=nbytes, slot=slot)

    def _finish(
        self,
        entry: _Staged,
        *,
        lora: Any = None,
        nbytes: int = 0,
        slot: DeviceSlotReservation | None = None,
        error: str | None = None,
    ) -> None:
        with self._lock:
            cancelled = entry.cancelled
            if not cancelled:
                entry.lora, entry.nbytes, entry.slot = lora, nbytes, slot
                entry.error, entry.state = error, "failed" if error else "ready"
        if cancelled:
            if slot is not None:
                self.slots.release(slot)
            return
        if self.channel is not None:
            self.channel.report(entry.lora_id, entry.path, entry.status())

    def status_or_stage(self, lora_id: int, name: str, path: str) -> dict[str, Any]:
        """The staging status; a stage this worker never received starts now. Its channel
        message can be late: the API server asks by RPC when reports stop coming, and on
        a loaded machine that RPC can overtake a message the channel thread has not read."""
        if (lora_id, path) not in self.staging:
            self.stage(lora_id, name, path)  # idempotent: the late message finds it started
        entry = self.staging.get((lora_id, path))
        return entry.status() if entry is not None else _Staged(lora_id, name, path).status()  # removed meanwhile

    def _slot_of(self, prepared: PreparedAdapter | None) -> DeviceSlotReservation | None:
        """The slot an adapter built ahead was written into, if vLLM did not take it since."""
        slot = prepared.take_slot() if prepared else None
        if slot is None:
            return None
        if self.slots.adopt(slot):
            return slot
        self.slots.release(slot)
        return None

    # -- between steps (collective RPCs) -----------------------------------------------
    def install_many(self, items: list[list[Any]]) -> dict[str, Any]:
        """Install each ``[lora_id, path, replace]``; ``seconds``: how long the step boundary was held."""
        start = time.perf_counter()
        results = [self.install(lora_id, path, replace) for lora_id, path, replace in items]
        return {"results": results, "seconds": time.perf_counter() - start}

    def install_off_step(self, lora_id: int, path: str) -> dict[str, Any]:
        """The stage channel's install: a flip of the slot the adapter was staged into, made
        while the engine runs (no request maps to a new id yet). ``in_step``: it needs a copy
        into a slot, which only the install RPC between two steps may make."""
        start = time.perf_counter()
        result = self.install(lora_id, path, replace=False, off_step=True)
        return {**result, "seconds": time.perf_counter() - start}

    def install(self, lora_id: int, path: str, replace: bool, *, off_step: bool = False) -> dict[str, Any]:
        """Register, map and pin a staged adapter; with ``replace`` take over its slot id.

        Written into a slot while staging: the slot's mapping flips (size-independent).
        Otherwise (no slot was free) vLLM's ``activate_adapter`` copies it here, in the step.
        Idempotent: an install that came both ways (its channel answer was late) is made once."""
        manager = self.manager
        with self.slots.lock:
            done = self.installed.get(lora_id)
            if not replace and done is not None and done.path == path:
                return {"ok": True, "error": None}
            entry = self.staging.get((lora_id, path))
            if entry is None or entry.state != "ready":
                return {"ok": False, "error": f"adapter {lora_id} at {path} is not staged"}
            if off_step and not self.slots.claimable(entry.slot):
                return {
                    "ok": False,
                    "in_step": True,
                    "error": f"adapter {lora_id} is in no slot: it is copied in the step",
                }
            if not replace and lora_id not in manager.list_adapters():
                refusal = self.cache_room.make_room(self.installed, off_step=off_step)
                if refusal is not None:
                    return refusal
            if replace:
                self.previous[lora_id] = self.installed.get(lora_id)
            slot, entry.slot = entry.slot, None
            try:
                manager._registered_adapters[lora_id] = entry.lora
                if slot is None or not self.slots.claim(slot, lora_id, replace=replace, off_step=off_step):
                    self._copy_in_step(lora_id)
                manager._registered_adapters.pin(lora_id)
            except Exception as exc:  # e.g. a tensor that does not fit its slot
                if replace:
                    self.restore(lora_id)
                else:
                    manager.remove_adapter(lora_id)
                return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            self.installed[lora_id] = entry
            self.staging.pop((lora_id, path), None)
        return {"ok": True, "error": None}

    def _copy_in_step(self, lora_id: int) -> None:
        self.step_copies += 1
        self.manager.deactivate_adapter(lora_id)  # replaced in place: its slot must be written again
        self.manager.activate_adapter(lora_id)

    def restore(self, lora_id: int) -> None:
        """Undo an in-place install: the replaced weights take the slot id back (one flip,
        when they are still in their slot)."""
        manager = self.manager
        with self.slots.lock:
            previous = self.previous.pop(lora_id, None)
            if previous is None:
                self.slots.restore(lora_id)
                manager.remove_adapter(lora_id)
                self.installed.pop(lora_id, None)
                return
            manager._registered_adapters[lora_id] = previous.lora
            manager._registered_adapters.pin(lora_id)
            if not self.slots.restore(lora_id):
                self._copy_in_step(lora_id)
            self.installed[lora_id] = previous

    def commit(self, lora_id: int) -> None:
        with self.slots.lock:
            self.previous.pop(lora_id, None)
            self.slots.commit(lora_id)

    def remove(self, lora_id: int, path: str) -> None:
        """Free the slot of ``lora_id`` (if it holds ``path``) and forget staged copies."""
        slot = None
        with self._lock:
            staged = self.staging.pop((lora_id, path), None)
            if staged is not None:
                staged.cancelled = True
                slot, staged.slot = staged.slot, None
        if slot is not None:
            self.slots.release(slot)
        with self.slots.lock:  # an install off the step may be adding it on the channel thread
            entry = self.installed.get(lora_id)
            if entry is not None and entry.path == path:
                self.manager.remove_adapter(lora_id)
                del self.installed[lora_id]

    def reinstall(self) -> int:
        """Register every installed adapter again after vLLM dropped them all
        (``reset_lora_state`` at the end of a base-weight update)."""
        manager = self.manager
        with self.slots.lock:
            registered = manager.list_adapters()
            for lora_id, entry in self.installed.items():
                if lora_id not in registered:
                    manager._registered_adapters[lora_id] = entry.lora
                    manager._registered_adapters.pin(lora_id)
            for lora_id in list(self.installed)[: manager.lora_slots]:
                manager.activate_adapter(lora_id)  # into device slots now, not at the next request
        return len(self.installed)

    def state(self) -> dict[str, Any]:
        with self.slots.lock:  # installs change these on the channel thread
            registered = sorted(self.manager.list_adapters())
            installed = dict(self.installed)
        return {
            "registered": registered,
            "installed": {str(i): e.path for i, e in installed.items()},
            "staging": len(self.staging),
            "staged_bytes": sum(e.nbytes for e in installed.values()),
            "disk_loads": self.disk_loads,
            "single_reads": self.single_reads,  # stages that read their weight file once
            "reads_ahead": READS_AHEAD.started,  # weight files read ahead of their commit, on notice
            "reads_ahead_taken": READS_AHEAD.taken,  # stages that started from such a read
            "reads_ahead_discarded": READS_AHEAD.discarded,  # failed, or not the announced bytes
            "built_ahead": self.preparer.built,  # adapters built (and put in a free slot) from reads ahead
            "prepared_ahead": self.prepared_ahead,  # stages that adopted one (no load, no checks)
            "slot_writes": self.slots.writes,  # adapters written into a slot while staging
            "step_copies": self.step_copies,  # installs that copied in the step instead
            "slots_lost": self.slots.lost,  # reserved slots vLLM took back for a step
        }


def hotswap_of(worker: Any) -> WorkerHotSwap:
    hotswap = getattr(worker, "_lora_hotswap", None)
    if hotswap is None:
        install_lora_manager_hooks()  # done by install_hooks already; a worker never runs without them
        hotswap = worker._lora_hotswap = WorkerHotSwap(worker)
    return hotswap
