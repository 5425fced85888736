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
from dataclasses import dataclass, field

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
    VersionInfo,
)
from ..watcher import StoreWatcher
from .engine_api import CheckpointRejected, EngineAdapter, LoraHandle, NoCapacity

logger = logging.getLogger("vllm.lora_hotswap")


class VersionBusy(Exception):
    """A version's LoRA name still has requests in flight under an older slot id."""


@dataclass
class _AdapterState:
    current: LoraHandle | None = None
    installed: dict[str, LoraHandle] = field(default_factory=dict)  # version -> handle
    idle_since: dict[str, float] = field(default_factory=dict)  # non-current versions
    failed: dict[str, str] = field(default_factory=dict)  # version -> reason, not retried
    nbytes: dict[str, int] = field(default_factory=dict)  # staged host bytes per installed version
    state: str = "waiting"
    last_swap: SwapRecord | None = None
    last_error: str | None = None


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
        self._adapters: dict[str, _AdapterState] = {}
        self._ids: dict[tuple[str, str], int] = {}
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
            if any(s.idle_since for s in self._adapters.values()):
                timeout = min(timeout, 0.5)  # versions to retire: look again soon
            hinted = self.watcher.wait(timeout)
            if self._stop.is_set():
                break
            try:
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + self.settings.poll_interval
                    self.sync_once()
                else:
                    self.sync_once(only=hinted) if hinted else self._housekeeping()
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
        for adapter in sorted(changed):
            record = self._sync_adapter(adapter)
            if record is not None:
                records.append(record)
        self._housekeeping(force_heartbeat=bool(records))
        return records

    def _housekeeping(self, force_heartbeat: bool = False) -> None:
        retired = self._retire_idle()
        if force_heartbeat or retired or time.time() - self._last_heartbeat >= self.settings.poll_interval:
            self._heartbeat()

    def _sync_adapter(self, adapter: str) -> SwapRecord | None:
        with self._lock:
            state = self._adapters.setdefault(adapter, _AdapterState())
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
    def _swap(self, adapter: str, version: str, state: _AdapterState, *, make_current: bool) -> SwapRecord:
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
            info = self.store.validate(adapter, version)
            if make_current:  # since the store changed: a publish, or a pin/follow of an older version
                changed_at = max(info.ready_at, self.store.adapter_dir(adapter).stat().st_mtime)
                timings["detect"] = max(0.0, started - changed_at)
            self._check_compatible(info)
            handle = state.installed.get(version)
            if handle is None:
                if make_current and state.current is not None and self.settings.mode == "inplace":
                    replace = state.current
                elif not self._has_capacity():
                    self._evict_one_idle()
                    if not self._has_capacity():
                        if not (make_current and state.current is not None):
                            raise NoCapacity(
                                f"all {self.limits.max_cpu_loras} LoRA slots (--max-cpu-loras) are in use"
                            )
                        replace = state.current
                        logger.warning(
                            "hot-swap: %s: no spare LoRA slot for a versioned swap; swapping %s in place "
                            "(raise --max-cpu-loras to keep versioned semantics)", adapter, version,
                        )
                handle = self._handle_for(adapter, version, replace, make_current)
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
        except (NoCapacity, VersionBusy, NotFoundError) as exc:  # not the version's fault: retry later
            self._undo(handle, replace, installed)
            state.state = "no-slot" if isinstance(exc, NoCapacity) else "waiting"
            message = f"{adapter}@{version} waits: {exc}"
            if state.last_error != message:  # retried every poll: say it once
                logger.warning("hot-swap: %s", message)
            state.last_error = message
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

    def _record_swap(self, adapter: str, state: _AdapterState, record: SwapRecord) -> SwapRecord:
        state.last_swap = record
        if self.metrics is not None:
            self.metrics.swap(adapter, record)
        self._update_slot_metrics()
        return record

    def _update_slot_metrics(self) -> None:
        if self.metrics is not None:
            states = list(self._adapters.values())
            self.metrics.installed(sum(len(s.installed) for s in states), sum(sum(s.nbytes.values()) for s in states))

    def _failed(
        self, adapter: str, version: str, state: _AdapterState, phase: str, reason: str,
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

    def _check_compatible(self, info: VersionInfo) -> None:
        config = info.config
        rank = max([config.r, *config.rank_pattern.values()])
        if rank > self.limits.max_lora_rank:
            raise CheckpointRejected("validate", f"rank {rank} exceeds the engine's --max-lora-rank {self.limits.max_lora_rank}")
        if config.bias != "none":
            raise CheckpointRejected("validate", f"bias={config.bias!r}: vLLM serves LoRA adapters only with bias='none'")
        if config.base_model and self.limits.base_models:
            wanted = {_model_key(m) for m in self.limits.base_models}
            if _model_key(config.base_model) not in wanted:
                raise CheckpointRejected(
                    "validate",
                    f"trained on base model {config.base_model!r}; this engine serves {self.limits.base_models[0]!r}",
                )

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

    def _handle_for(self, adapter: str, version: str, replace: LoraHandle | None, current: bool) -> LoraHandle:
        path = str(self.store.version_dir(adapter, version))
        # In-place mode serves the current weights under the adapter's own name (one
        # slot id for all its versions); every other version has a name of its own.
        name = adapter if self.settings.mode == "inplace" and current else f"{adapter}@{version}"
        if replace is not None:
            self._ids.pop((adapter, replace.version), None)  # that id no longer holds the old weights
            self._ids[(adapter, version)] = replace.lora_id
            return LoraHandle(adapter, version, replace.lora_id, name, path)
        lora_id = self._ids.get((adapter, version))
        if lora_id is None:
            probe = LoraHandle(adapter, version, 0, name, path)
            if self.engine.in_flight(probe):
                raise VersionBusy(f"requests for {name} under an older slot are still running")
            lora_id = self._ids[(adapter, version)] = self.engine.new_lora_id()
        return LoraHandle(adapter, version, lora_id, name, path)

    # -- capacity and retirement -------------------------------------------------------
    def _has_capacity(self) -> bool:
        return sum(len(s.installed) for s in self._adapters.values()) < self.limits.max_cpu_loras

    def _evict_one_idle(self) -> bool:
        candidates = [
            (since, adapter, version)
            for adapter, s in self._adapters.items()
            for version, since in s.idle_since.items()
        ]
        for _, adapter, version in sorted(candidates):
            state = self._adapters[adapter]
            if self.engine.in_flight(state.installed[version]) == 0:
                self._remove_version(adapter, state, version)
                return True
        return False

    def _retire_idle(self) -> bool:
        retired = False
        with self._lock:
            now = time.monotonic()
            for adapter, state in self._adapters.items():
                for version, since in list(state.idle_since.items()):
                    if now - since >= self.settings.retire_grace and self.engine.in_flight(state.installed[version]) == 0:
                        self._remove_version(adapter, state, version)
                        retired = True
        return retired

    def _remove_version(self, adapter: str, state: _AdapterState, version: str) -> None:
        handle = state.installed.pop(version)
        state.idle_since.pop(version, None)
        state.nbytes.pop(version, None)
        self.engine.unroute(adapter, version)
        self.engine.remove(handle)
        self._update_slot_metrics()
        logger.info("hotswap retired adapter=%s version=%s", adapter, version)

    def _retire_adapter(self, adapter: str, state: _AdapterState) -> None:
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
            state = self._adapters.setdefault(adapter, _AdapterState())
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
        state = self._adapters.get(adapter)
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
        state = self._adapters.get(adapter)
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
            for name, s in sorted(list(self._adapters.items()))
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


def _model_key(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1].lower()
