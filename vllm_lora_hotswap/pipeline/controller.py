"""The swap pipeline: detect → validate → stage → install → probe → switch → retire.

Runs in its own thread in the process that routes requests (the API server,
or the trainer for an offline ``LLM``) and drives the engine only through
:class:`EngineAdapter`. Nothing here imports vLLM.

Consistency rules it keeps:

* versioned mode: every version gets its own LoRA name (``adapter@version``)
  and id, so a request runs on one version from its first step to its last and
  no prefix-cache block crosses versions. An id, once bound to a name, stays
  bound for the life of the process (two ids under one name kill a 0.32
  engine).
* a replaced version leaves its slot only when no admitted request uses it and
  ``retire_grace`` has passed (requests routed just before the switch may not
  have reached the engine yet).
* a version that fails any phase is never routed; the previous version keeps
  serving and the failure is recorded in the store so no engine loops on it.
"""

from __future__ import annotations

import logging
import threading
import time

from ..events import EventBus, SwapEvent
from ..metrics import HotSwapMetrics
from ..settings import HotSwapSettings
from ..store import (
    AdapterServing,
    CheckpointStore,
    InstanceRecord,
    InvalidCheckpointError,
    NotFoundError,
    StoreError,
    StoreUnavailableError,
    SwapRecord,
    UnreadableError,
    VersionInfo,
)
from ..watcher import StoreWatcher
from .compat import check_compatible
from .engine_api import CheckpointRejected, EngineAdapter, LoraHandle, NoCapacity
from .slots import AdapterState, SlotTable, VersionBusy

logger = logging.getLogger("vllm.lora_hotswap")


class SwapController:
    def __init__(
        self,
        store: CheckpointStore,
        engine: EngineAdapter,
        settings: HotSwapSettings,
        instance_id: str,
        *,
        bus: EventBus | None = None,
        metrics: HotSwapMetrics | None = None,
        url: str | None = None,
        vllm_version: str = "",
    ):
        from .. import __version__

        self.store = store
        self.engine = engine
        self.settings = settings
        self.instance_id = instance_id
        self.bus = bus or EventBus()
        self.metrics = metrics
        self.limits = engine.limits()
        self.watcher = StoreWatcher(store, settings.serves, settings.poll_interval, settings.events)
        self.weight_version: str | None = None
        self._record = InstanceRecord(
            instance_id=instance_id,
            url=url,
            vllm_version=vllm_version,
            plugin_version=__version__,
            started_at=time.time(),
            poll_interval=settings.poll_interval,
            mode=settings.mode,
        )
        self.slots = SlotTable(engine, self.limits, settings)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store_error: str | None = None
        self._last_heartbeat = 0.0

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Serve every adapter's active version, then follow the store in a thread."""
        self.sync_once()
        self.watcher.start_events(self._stop)
        self._thread = threading.Thread(target=self._run, name="hotswap-controller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.watcher.wake()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        next_poll = time.monotonic() + self.settings.poll_interval
        while not self._stop.is_set():
            now = time.monotonic()
            timeout = max(0.0, next_poll - now)
            if self.slots.has_idle:
                timeout = min(timeout, 0.5)  # versions to retire: look again soon
            hinted = self.watcher.wait(timeout)
            if self._stop.is_set():
                break
            try:
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + self.settings.poll_interval
                    self.sync_once()
                else:
                    self.sync_once(only=hinted) if hinted or self.slots.slot_freed else self._housekeeping()
            except Exception:  # the loop must survive anything; the next poll retries
                logger.exception("hot-swap controller iteration failed")

    # -- one pass ----------------------------------------------------------------------
    def sync_once(self, only: set[str] | None = None) -> list[SwapRecord]:
        """Poll the store (or only ``only``), swap what changed, retire, heartbeat."""
        records: list[SwapRecord] = []
        try:
            changed = self.watcher.poll(only)
            if self._store_error is not None:
                logger.warning("hot-swap: store %s is available again", self.store.root)
            self._store_error = None
        except (StoreUnavailableError, OSError) as exc:
            if self._store_error is None:
                logger.error("hot-swap: %s; still serving the last good versions", exc)
            self._store_error = str(exc)
            changed = set()
        changed |= self.slots.take_waiting()
        for adapter in sorted(changed):
            record = self._sync_adapter(adapter)
            if record is not None:
                records.append(record)
        self._housekeeping(force_heartbeat=bool(records))
        return records

    def _housekeeping(self, force_heartbeat: bool = False) -> None:
        with self._lock:
            retired = self.slots.retire_idle()
        if retired:
            self._update_slot_metrics()
        if force_heartbeat or retired or time.time() - self._last_heartbeat >= self.settings.poll_interval:
            self._heartbeat()

    def _sync_adapter(self, adapter: str) -> SwapRecord | None:
        with self._lock:
            state = self.slots.state(adapter)
            try:
                if not self.store.adapter_dir(adapter).is_dir():
                    if state.current is not None:
                        state.last_error = "adapter directory vanished from the store; still serving the last good version"
                        logger.warning("hot-swap: %s: %s", adapter, state.last_error)
                    return None
                if self.store.is_retired(adapter):
                    self._retire_adapter(adapter, state)
                    return None
                target = self.store.active_version(adapter)
                newest_seen = max(filter(None, (target, state.current.version if state.current else None)), default=None)
                known_bad = self.store.failed_versions_after(adapter, newest_seen)
            except StoreError as exc:
                state.last_error = str(exc)
                self.watcher.invalidate(adapter)
                return None
            for version, records in known_bad.items():
                # Refused elsewhere already: not retried here, but reported here too.
                if version not in state.failed:
                    record = records[0]
                    self._failed(adapter, version, state, record.phase,
                                 f"refused by {record.instance_id}: {record.reason}", {}, remember=True, record_in_store=False)  # fmt: skip
            if target is None or target in state.failed:
                state.state = "serving" if state.current else "waiting"
                return None
            if state.current is not None and state.current.version == target:
                state.state = "serving"
                return None
            return self._swap(adapter, target, state, make_current=True)

    # -- the pipeline ------------------------------------------------------------------
    def _swap(self, adapter: str, version: str, state: AdapterState, *, make_current: bool) -> SwapRecord:
        started = time.time()
        lap_start = time.perf_counter()
        timings: dict[str, float] = {}

        def lap(phase_name: str) -> None:
            nonlocal lap_start
            now = time.perf_counter()
            timings[phase_name] = now - lap_start
            lap_start = now

        phase = "validate"
        handle: LoraHandle | None = None
        replace: LoraHandle | None = None
        installed = False
        staged_bytes: int | None = None
        info: VersionInfo | None = None
        state.state = "swapping"
        try:
            handle = state.installed.get(version)
            # The slot first: an adapter waiting for one must not re-read its files at every poll.
            if handle is None:
                replace = self.slots.slot_for(adapter, version, make_current=make_current)
            info = self.store.validate(adapter, version)
            if make_current:  # since the store changed: a publish, or a pin/follow of an older version
                changed_at = max(info.ready_at, self.store.adapter_dir(adapter).stat().st_mtime)
                timings["detect"] = max(0.0, started - changed_at)
            check_compatible(info.config, self.limits)
            if handle is None:
                handle = self.slots.handle_for(adapter, version, str(self.store.version_dir(adapter, version)), replace, make_current)
                lap("validate")
                phase = "stage"
                self.engine.stage(handle)
                staged_bytes = self._wait_staged(handle)
                lap("stage")
                phase = "install"
                stall = self.engine.install(handle, replace)
                installed = True
                lap("install")
                timings["engine_stall"] = stall  # the part of install that held the engine loop
                if self.settings.probe:
                    phase = "probe"
                    self.engine.probe(handle)
                    lap("probe")
            else:
                lap("validate")
            phase = "switch"
            self.engine.route(handle, current=make_current)
            if replace is not None:
                self.engine.commit(handle)
                if replace.version != version:
                    self.engine.unroute(adapter, replace.version)
                state.installed.pop(replace.version, None)
                state.nbytes.pop(replace.version, None)
            state.installed[version] = handle
            if staged_bytes is not None:
                state.nbytes[version] = staged_bytes
            state.idle_since.pop(version, None)
            if make_current:
                previous, state.current = state.current, handle
                if previous is not None and previous.version != version and replace is None:
                    state.idle_since[previous.version] = time.monotonic()
            else:
                state.idle_since[version] = time.monotonic()
            lap("switch")
        except (CheckpointRejected, InvalidCheckpointError) as exc:
            reason = exc.reason if isinstance(exc, CheckpointRejected) else str(exc)
            phase = exc.phase if isinstance(exc, CheckpointRejected) else phase
            self._undo(handle, replace, installed)
            return self._failed(adapter, version, state, phase, reason, timings, remember=True, record_in_store=True)
        except (NoCapacity, VersionBusy, NotFoundError, UnreadableError) as exc:  # not the version's fault: retry later
            self._undo(handle, replace, installed)
            state.state = "no-slot" if isinstance(exc, NoCapacity) else "waiting"
            message = f"{adapter}@{version} waits: {exc}"
            if state.last_error != message:  # retried later: say it once
                logger.warning("hot-swap: %s", message)
            state.last_error = message
            if isinstance(exc, NoCapacity):
                self.slots.wait_for_slot(adapter)  # tried again when a slot frees, not at every poll
            else:
                self.watcher.invalidate(adapter)
            return self._record_swap(adapter, state, SwapRecord(version=version, result="waiting", phase=phase, error=str(exc), timings=timings, finished_at=time.time()))
        except Exception as exc:  # engine or store trouble: not the version's fault, retry later
            self._undo(handle, replace, installed)
            self.watcher.invalidate(adapter)
            return self._failed(adapter, version, state, phase, f"{type(exc).__name__}: {exc}", timings, remember=False, record_in_store=False)
        state.state = "serving" if state.current else "waiting"
        state.last_error = None
        record = SwapRecord(
            version=version,
            result="served",
            mode="inplace" if replace is not None else "versioned",
            timings=timings,
            finished_at=time.time(),
        )
        self._log_swap(adapter, record)
        if make_current:
            self.bus.emit(SwapEvent(kind="updated", adapter=adapter, version=version, instance_id=self.instance_id,
                                    metadata=dict(info.metadata) if info else {}, timings=timings))
            if self.metrics is not None:
                self.metrics.served(adapter, version)
        return self._record_swap(adapter, state, record)

    def _record_swap(self, adapter: str, state: AdapterState, record: SwapRecord) -> SwapRecord:
        state.last_swap = record
        if self.metrics is not None:
            self.metrics.swap(adapter, record)
        self._update_slot_metrics()
        return record

    def _update_slot_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.installed(self.slots.installed_count, self.slots.installed_bytes)

    def _failed(
        self, adapter: str, version: str, state: AdapterState, phase: str, reason: str,
        timings: dict[str, float], *, remember: bool, record_in_store: bool,
    ) -> SwapRecord:
        """A swap failed. ``remember``: never try this version again here; ``record_in_store``:
        mark it failed for every engine (a fault of the version, not of this engine)."""
        state.state = "serving" if state.current else "failed"
        state.last_error = f"{adapter}@{version} rejected at {phase}: {reason}"
        if remember:
            state.failed[version] = reason
        if record_in_store:
            try:
                self.store.record_failure(adapter, version, self.instance_id, phase, reason)
            except (StoreError, OSError) as exc:
                logger.warning("hot-swap: could not record the failure of %s@%s: %s", adapter, version, exc)
        record = SwapRecord(version=version, result="failed", phase=phase, error=reason, timings=timings, finished_at=time.time())
        self._log_swap(adapter, record)
        self.bus.emit(SwapEvent(kind="failed", adapter=adapter, version=version, instance_id=self.instance_id,
                                error_message=reason, phase=phase, timings=timings))
        return self._record_swap(adapter, state, record)

    def _undo(self, handle: LoraHandle | None, replace: LoraHandle | None, installed: bool) -> None:
        if handle is None:
            return
        try:
            if replace is not None and installed:
                self.engine.restore(handle)
            elif replace is None:
                self.engine.remove(handle)
        except Exception:
            logger.exception("hot-swap: cleanup after a failed swap of %s@%s failed", handle.adapter, handle.version)

    def _log_swap(self, adapter: str, record: SwapRecord) -> None:
        fields = " ".join(f"{p}_ms={1000 * s:.1f}" for p, s in record.timings.items())
        extra = f" phase={record.phase} error={record.error!r}" if record.error else ""
        level = logging.INFO if record.result == "served" else logging.WARNING
        logger.log(level, "hotswap swap adapter=%s version=%s result=%s mode=%s %s%s",
                   adapter, record.version, record.result, record.mode, fields, extra)

    def _wait_staged(self, handle: LoraHandle) -> int:
        """Wait for every worker to stage ``handle``; returns the staged bytes."""
        deadline = time.monotonic() + self.settings.stage_timeout
        delay = 0.002
        while True:
            status = self.engine.stage_status(handle)
            if status.state == "ready":
                return status.nbytes
            if status.state == "failed":
                raise CheckpointRejected("stage", status.error or "staging failed")
            if time.monotonic() > deadline:
                raise CheckpointRejected("stage", f"not staged within {self.settings.stage_timeout:.0f}s (VLLM_HOTSWAP_STAGE_TIMEOUT)")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _retire_adapter(self, adapter: str, state: AdapterState) -> None:
        """The store retired ``adapter``: stop routing it, free slots as requests finish."""
        if state.current is None:
            return
        self.engine.unroute(adapter, None)
        for version in state.installed:
            state.idle_since.setdefault(version, time.monotonic())
        state.current = None
        state.state = "retired"
        if self.metrics is not None:
            self.metrics.served(adapter, None)
        self.bus.emit(SwapEvent(kind="retired", adapter=adapter, version=None, instance_id=self.instance_id))

    # -- pinned versions and status ----------------------------------------------------
    def ensure(self, adapter: str, version: str) -> LoraHandle:
        """Install ``adapter@version`` (a retained, non-active version) for a request that pins it."""
        with self._lock:
            state = self.slots.state(adapter)
            handle = state.installed.get(version)
            if handle is not None:
                self.touch(adapter, version)
                return handle
            if version in state.failed:
                raise CheckpointRejected("validate", state.failed[version])
            if not self.store.is_ready(adapter, version):
                raise NotFoundError(f"{adapter}@{version}: no such READY version in the store")
            record = self._swap(adapter, version, state, make_current=False)
            if record.result == "waiting":
                raise NoCapacity(record.error or "no LoRA slot free")
            if record.result != "served":
                raise CheckpointRejected(record.phase or "validate", record.error or "not servable")
            return state.installed[version]

    def touch(self, adapter: str, version: str) -> None:
        """A request used a non-current version: restart its idle clock."""
        state = self.slots.adapters.get(adapter)
        if state is not None and version in state.idle_since:
            state.idle_since[version] = time.monotonic()

    @property
    def started_at(self) -> float:
        return self._record.started_at

    def record_weight_version(self, version: str | None) -> None:
        """The engine's base weights were replaced (the served adapters stay installed)."""
        self.weight_version = version
        if self.metrics is not None and version is not None:
            self.metrics.weights(version)
        logger.info("hotswap base weights updated version=%s", version)
        self._heartbeat()

    def current(self, adapter: str) -> LoraHandle | None:
        state = self.slots.adapters.get(adapter)
        return state.current if state else None

    def status(self) -> InstanceRecord:
        """A snapshot of every adapter's state. Never waits for a swap in progress
        (``list()`` copies under the GIL), so it can answer while one is stuck."""
        adapters = {
            name: AdapterServing(
                served_version=s.current.version if s.current else None,
                installed_versions=sorted(list(s.installed)),
                state=s.state,
                last_swap=s.last_swap,
                last_error=s.last_error,
            )
            for name, s in sorted(list(self.slots.adapters.items()))
        }
        return self._record.model_copy(
            update={
                "heartbeat": time.time(),
                "adapters": adapters,
                "weight_version": self.weight_version,
                "last_error": self._store_error,
            }
        )

    def _heartbeat(self) -> None:
        record = self.status()
        self._last_heartbeat = record.heartbeat
        try:
            self.store.write_instance_record(record)
        except (StoreError, OSError) as exc:
            logger.debug("hot-swap: heartbeat not written: %s", exc)

