"""A swap as a transaction: one (adapter, version) through its steps, each with one undo.

    reserve → validate → stage → install → probe → switch

Each step is all or nothing (one that fails cleans up its own partial work),
so an undo only ever reverts a step that completed. ``reserve`` takes a LoRA
slot (undo: give it back), ``stage`` has the workers read the weights into a
slot while the engine runs (undo: drop the staged copy), ``install`` makes
the slot serve the version's id (undo: free the slot, or put the replaced
weights back for an in-place swap), ``probe`` runs a short generation on it
while requests for the adapter that arrive meanwhile wait for the verdict
(undo: let them go to the version serving now), and ``switch`` routes the
version's names to it and lets the waiting requests go to it. When a
step raises, or the transaction is superseded before ``install`` or
``switch``, the undos of the steps already done run newest first and the
exception goes to the controller, which decides what it means (a verdict on
the version, a wait, a retry). A transaction holds no lock while it works: it
takes the controller's lock only to read or change the slot table.

The transaction sees the controller only through :class:`TransactionHost`: the few
objects and callbacks it uses, so this module never imports the controller.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from ..settings import HotSwapSettings
from ..store import CheckpointStore, VersionInfo
from .batching import GroupCall
from .compat import check_compatible
from .engine_api import CheckpointRejected, EngineAdapter, EngineLimits, InstallRequest, LoraHandle
from .slots import EvictionNeeded, SlotTable, VersionBusy, VersionReservation

logger = logging.getLogger("vllm.lora_hotswap")
Step = tuple[str, Callable[[], None], Callable[[], None] | None]
STAGE_WAIT_S = 0.5  # the longest wait for a staging signal before its status is asked again


class Superseded(Exception):
    """A newer target for the adapter arrived; this version is never installed or switched to."""


class TransactionHost(Protocol):
    """What a transaction uses of the controller that runs it (the controller is one)."""

    store: CheckpointStore
    engine: EngineAdapter
    settings: HotSwapSettings
    limits: EngineLimits
    lock: threading.Lock
    slots: SlotTable
    stage_starts: GroupCall
    stage_statuses: GroupCall
    installs: GroupCall
    probes: GroupCall

    def entered(self, tx: SwapTransaction, phase: str) -> None: ...

    def superseded(self, adapter: str, version: str) -> bool: ...

    def retire(self, handle: LoraHandle, *, min_idle: float) -> bool: ...


class SwapTransaction:
    def __init__(self, pipeline: TransactionHost, adapter: str, version: str, *, make_current: bool):
        self.pipeline = pipeline
        self.adapter = adapter
        self.version = version
        self.make_current = make_current  # False: a pinned version a request asked for
        self.timings: dict[str, float] = {}  # phase -> seconds, plus "engine_stall" and the stage's own
        self.reservation: VersionReservation | None = None
        self.info: VersionInfo | None = None
        self.nbytes = 0
        self.phase = "validate"

    @property
    def handle(self) -> LoraHandle:
        assert self.reservation is not None
        return self.reservation.handle

    @property
    def in_place(self) -> bool:
        return self.reservation is not None and self.reservation.replace is not None

    def steps(self, installed: LoraHandle | None) -> list[Step]:
        if installed is not None:  # e.g. a pin back to a version still in its slot
            return [("validate", self._validate, None), ("switch", lambda: self._switch_to(installed), None)]
        steps: list[Step] = [
            ("reserve", self._reserve, self._release),  # first: no file is read for an adapter without a slot
            ("validate", lambda: self._validate(staging=True), None),
            ("stage", self._stage, self._unstage),
            ("install", self._install, self._uninstall),
        ]
        if self.pipeline.settings.probe:
            steps.append(("probe", self._probe, self._let_requests_go))
        steps.append(("switch", self._switch, None))
        return steps

    def run(self, installed: LoraHandle | None) -> None:
        undos: list[Callable[[], None]] = []
        try:
            for phase, do, undo in self.steps(installed):
                self.phase = phase
                self.pipeline.entered(self, phase)
                if (
                    phase in ("install", "switch")
                    and self.make_current
                    and self.pipeline.superseded(self.adapter, self.version)
                ):
                    raise Superseded(f"{self.adapter}@{self.version} was superseded before {phase}")
                started = time.perf_counter()
                do()
                if phase != "reserve":
                    self.timings[phase] = time.perf_counter() - started
                if undo is not None:
                    undos.append(undo)
        except BaseException:
            for undo in reversed(undos):
                try:
                    undo()
                except Exception:
                    logger.exception("hot-swap: undoing a step of %s@%s failed", self.adapter, self.version)
            raise

    # -- steps and their undos ---------------------------------------------------------
    def _reserve(self) -> None:
        pipeline, evict = self.pipeline, True
        path = str(pipeline.store.version_dir(self.adapter, self.version))
        while True:
            try:
                with pipeline.lock:
                    self.reservation = pipeline.slots.reserve(
                        self.adapter,
                        self.version,
                        path,
                        pipeline.engine.new_lora_id,
                        make_current=self.make_current,
                        evict=evict,
                    )
                break
            except EvictionNeeded as need:
                evict = any(pipeline.retire(handle, min_idle=0.0) for handle in need.candidates)
        if self.reservation.new_id and pipeline.engine.in_flight(self.handle):
            self._release()
            raise VersionBusy(f"requests for {self.handle.served_name} under an older slot are still running")

    def _release(self) -> None:
        with self.pipeline.lock:
            self.pipeline.slots.release(self.reservation)

    def _validate(self, *, staging: bool = False) -> None:
        store = self.pipeline.store
        # An engine whose staging hashes the weight file against READY as it reads it (and checks
        # its shapes) gets a validation that leaves it unread: one read per engine, and the
        # digest still gates the install (a mismatch fails the stage).
        read_weights = not (staging and getattr(self.pipeline.engine, "hashes_while_staging", False))
        started_at = time.time()  # the pipeline starts: detect ends here, validate's own time is its own
        self.info = store.validate(self.adapter, self.version, read_weights=read_weights)
        if self.make_current:  # since the store changed: a publish, or a pin/follow of an older version
            # File times come from the kernel's coarse clock, which trails the wall clock by a few
            # milliseconds: detect is an upper bound (docs/operations/observability.md).
            changed_at = max(self.info.ready_at, store.adapter_dir(self.adapter).stat().st_mtime)
            self.timings["detect"] = max(0.0, started_at - changed_at)
        check_compatible(self.info.config, self.pipeline.limits)

    def _stage(self) -> None:
        self.pipeline.stage_starts(self.handle)
        try:
            self.nbytes = self._wait_staged()
        except BaseException:
            self._unstage()  # each step is all or nothing: a failed stage leaves no staged copy
            raise

    def _wait_staged(self) -> int:
        pipeline, settings = self.pipeline, self.pipeline.settings
        deadline = time.monotonic() + settings.stage_timeout
        while True:
            status = pipeline.stage_statuses(self.handle)
            if status.state == "ready":
                self.timings.update(status.timings)  # the stage's own phases (read, load, check, slot)
                return status.nbytes
            if status.state == "failed":
                raise CheckpointRejected("stage", status.error or "staging failed")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CheckpointRejected(
                    "stage", f"not staged within {settings.stage_timeout:.0f}s (VLLM_HOTSWAP_STAGE_TIMEOUT)"
                )
            pipeline.engine.wait_staged(self.handle, min(remaining, STAGE_WAIT_S))

    def _unstage(self) -> None:
        self.pipeline.engine.remove(self.handle)

    def _install(self) -> None:
        assert self.reservation is not None
        self.timings["engine_stall"] = self.pipeline.installs(InstallRequest(self.handle, self.reservation.replace))

    def _uninstall(self) -> None:
        if self.in_place:
            self.pipeline.engine.restore(self.handle)
        else:
            self.pipeline.engine.remove(self.handle)

    def _probe(self) -> None:
        # A request for the adapter that arrives during the probe would otherwise go to the
        # old version and then wait behind the probe's step: it waits for the verdict instead.
        # A sample request that pins this version (a rollout) need not wait: it starts at once,
        # its first token may serve as the probe's evidence, and only its answer waits.
        engine = self.pipeline.engine
        try:
            if self.make_current:
                engine.hold_requests(self.adapter)
            if not self.in_place:  # an in-place slot is the serving one: nothing new to open
                engine.open_for_sampling(self.handle)
            self.pipeline.probes(self.handle)
        except BaseException:
            self._let_requests_go()
            raise

    def _let_requests_go(self, *, passed: bool = False) -> None:
        """The probe's undo (and, with ``passed``, the switch's last act)."""
        engine = self.pipeline.engine
        if not self.in_place:
            engine.close_for_sampling(self.handle, passed=passed)
        if self.make_current:
            engine.release_requests(self.adapter)

    def _switch(self) -> None:
        pipeline, handle = self.pipeline, self.handle
        assert self.reservation is not None
        pipeline.engine.route(handle, current=self.make_current)
        with pipeline.lock:
            pipeline.slots.installed(self.reservation, self.nbytes, make_current=self.make_current)
        self._let_requests_go(passed=True)  # after the route: they go to this version
        replace = self.reservation.replace
        if replace is not None:
            pipeline.engine.commit(handle)
            if replace.version != self.version:
                pipeline.engine.unroute(self.adapter, replace.version)

    def _switch_to(self, installed: LoraHandle) -> None:
        self.reservation = VersionReservation(installed, None, new_id=False)
        self.pipeline.engine.route(installed, current=self.make_current)
        with self.pipeline.lock:
            self.pipeline.slots.switched(installed, make_current=self.make_current)
