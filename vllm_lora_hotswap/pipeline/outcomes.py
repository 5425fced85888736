"""What a swap's outcome changes: the adapter's state in the slot table, the failure record
in the store, the event bus, the metrics and the log. The controller hands each
transaction's outcome (served, waiting or failed) here."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from ..events import EventBus, SwapEvent
from ..metrics import HotSwapMetrics
from ..store import CheckpointStore, StoreError, SwapRecord
from ..watcher import StoreWatcher
from .engine_api import NoCapacity
from .slots import SlotTable

if TYPE_CHECKING:
    from .transaction import SwapTransaction

logger = logging.getLogger("vllm.lora_hotswap")
# Refused versions remembered per adapter (never retried here), newest kept. An older one
# is still refused by the store's failure record, or by validation if a request pins it.
REMEMBERED_FAILURES = 64


class SwapOutcomes:
    def __init__(
        self,
        store: CheckpointStore,
        slots: SlotTable,
        lock: threading.Lock,
        bus: EventBus,
        metrics: HotSwapMetrics | None,
        watcher: StoreWatcher,
        instance_id: str,
    ):
        self.store = store
        self.slots = slots
        self.lock = lock  # the controller's: guards the slot table
        self.bus = bus
        self.metrics = metrics
        self.watcher = watcher
        self.instance_id = instance_id

    def served(self, tx: SwapTransaction) -> SwapRecord:
        state = self.slots.state(tx.adapter)
        with self.lock:
            state.state = "serving" if state.current else "waiting"
            state.last_error = None
        record = SwapRecord(
            version=tx.version,
            result="served",
            mode="inplace" if tx.in_place else "versioned",
            timings=tx.timings,
            finished_at=time.time(),
        )
        self._log(tx.adapter, record)
        if tx.make_current:
            metadata = dict(tx.info.metadata) if tx.info else {}
            self.bus.emit(
                SwapEvent(
                    kind="updated",
                    adapter=tx.adapter,
                    version=tx.version,
                    instance_id=self.instance_id,
                    metadata=metadata,
                    timings=tx.timings,
                )
            )
            if self.metrics is not None:
                self.metrics.served(tx.adapter, tx.version)
        return self.record(tx.adapter, record)

    def waits(self, adapter: str, version: str, tx: SwapTransaction, exc: Exception) -> SwapRecord:
        state = self.slots.state(adapter)
        message = f"{adapter}@{version} waits: {exc}"
        with self.lock:
            state.state = "no-slot" if isinstance(exc, NoCapacity) else "waiting"
            repeated, state.last_error = state.last_error == message, message
            if isinstance(exc, NoCapacity):
                self.slots.wait_for_slot(adapter)  # tried again when a slot frees, not at every poll
        if not repeated:  # retried later: say it once
            logger.warning("hot-swap: %s", message)
        if not isinstance(exc, NoCapacity):
            self.watcher.invalidate(adapter)
        record = SwapRecord(
            version=version,
            result="waiting",
            phase=tx.phase,
            error=str(exc),
            timings=tx.timings,
            finished_at=time.time(),
        )
        return self.record(adapter, record)

    def failed(
        self,
        adapter: str,
        version: str,
        phase: str,
        reason: str,
        timings: dict[str, float],
        *,
        remember: bool,
        record_in_store: bool,
    ) -> SwapRecord:
        """A swap failed. ``remember``: never try this version again here; ``record_in_store``:
        mark it failed for every engine (a fault of the version, not of this engine)."""
        state = self.slots.state(adapter)
        with self.lock:
            state.state = "serving" if state.current else "failed"
            state.last_error = f"{adapter}@{version} rejected at {phase}: {reason}"
            if remember:
                state.failed[version] = reason
                for old in sorted(state.failed)[:-REMEMBERED_FAILURES]:  # names sort in publication order
                    del state.failed[old]
        if record_in_store:
            try:
                self.store.record_failure(adapter, version, self.instance_id, phase, reason)
            except (StoreError, OSError) as exc:
                logger.warning("hot-swap: could not record the failure of %s@%s: %s", adapter, version, exc)
        record = SwapRecord(
            version=version, result="failed", phase=phase, error=reason, timings=timings, finished_at=time.time()
        )
        self._log(adapter, record)
        self.bus.emit(
            SwapEvent(
                kind="failed",
                adapter=adapter,
                version=version,
                instance_id=self.instance_id,
                error_message=reason,
                phase=phase,
                timings=timings,
            )
        )
        return self.record(adapter, record)

    def record(self, adapter: str, record: SwapRecord) -> SwapRecord:
        with self.lock:
            self.slots.state(adapter).last_swap = record
        if self.metrics is not None:
            self.metrics.swap(adapter, record)
        self.update_slot_metrics()
        return record

    def update_slot_metrics(self) -> None:
        if self.metrics is not None:
            with self.lock:
                count, nbytes = self.slots.installed_count, self.slots.installed_bytes
            self.metrics.installed(count, nbytes)

    def _log(self, adapter: str, record: SwapRecord) -> None:
        fields = " ".join(f"{p}_ms={1000 * s:.1f}" for p, s in record.timings.items())
        extra = f" phase={record.phase} error={record.error!r}" if record.error else ""
        level = logging.INFO if record.result == "served" else logging.WARNING
        logger.log(
            level,
            "hotswap swap adapter=%s version=%s result=%s mode=%s %s%s",
            adapter,
            record.version,
            record.result,
            record.mode,
            fields,
            extra,
        )
