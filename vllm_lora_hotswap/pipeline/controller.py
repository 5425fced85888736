"""The swap pipeline's scheduler: detect changes, run one transaction per (adapter,
version), retire what is left behind, report.

Runs in the process that routes requests (the API server, or the trainer for
an offline ``LLM``) and drives the engine only through :class:`EngineAdapter`.
Nothing here imports vLLM.

Scheduling:

* one job per changed adapter, up to ``VLLM_HOTSWAP_MAX_PARALLEL`` at once, so
  different adapters progress at the same time; their worker calls (stage,
  stage status, install) and their probes are batched (:mod:`.batching`);
* versions of one adapter stay ordered: an adapter has at most one job, a
  newer target marks it dirty, and the in-flight transaction of a superseded
  version stops before ``install`` or ``switch`` and undoes what it did;
* ``(adapter, version)`` is claimed by at most one transaction or retirement,
  so a request pinning a version (:meth:`SwapController.ensure`) waits for the
  transaction already installing it instead of starting another;
* ``lock`` guards the slot table and the scheduling state only; it is never
  held across a store read, an engine call or a wait, so status, metrics and
  requests on installed versions never wait behind a swap.

Consistency rules it keeps:

* versioned mode: every version gets its own LoRA name (``adapter@version``)
  and id, so a request runs on one version from its first step to its last and
  no prefix-cache block crosses versions.
* a replaced version leaves its slot only when no admitted request uses it and
  ``retire_grace`` has passed since a request last named it.
* a version is recorded failed in the store (for every engine) only on a
  verdict about the version itself; an engine that dies, times out or is
  paused says nothing about the checkpoint, and the version is tried again.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_for

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
)
from ..watcher import StoreWatcher
from .batching import GroupCall
from .engine_api import CheckpointRejected, EngineAdapter, EngineUnavailable, LoraHandle, NoCapacity
from .jobs import AdapterJobs
from .outcomes import SwapOutcomes
from .slots import SlotTable, VersionBusy
from .transaction import Superseded, SwapTransaction

logger = logging.getLogger("vllm.lora_hotswap")
_WAITS = (NoCapacity, VersionBusy, NotFoundError, UnreadableError)  # not the version's fault: later


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
            follows=list(settings.adapters),
        )
        self.lock = threading.Lock()
        self.slots = SlotTable(self.limits, settings)
        self.outcomes = SwapOutcomes(store, self.slots, self.lock, self.bus, metrics, self.watcher, instance_id)
        self.jobs: AdapterJobs[SwapRecord] = AdapterJobs(
            self._sync_adapter, settings.max_parallel, on_idle=self._job_ended
        )
        self.stage_starts = GroupCall(self._stage_batch)
        self.stage_statuses = GroupCall(engine.stage_status)
        self.installs = GroupCall(engine.install)
        self.probes = GroupCall(engine.probe, overlap=engine.probes_overlap)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store_error: str | None = None
        self._last_heartbeat = 0.0
        self._heartbeat_due = False
        # Retiring (an RPC the engine answers between steps) and the heartbeat (an fsync)
        # run here, off the controller thread, so detecting a publish never waits for them.
        self._housekeeper = ThreadPoolExecutor(1, thread_name_prefix="hotswap-housekeeping")
        self._housekeeping_lock = threading.Lock()
        self._housekeeping_wanted = False
        self._housekeeping_running = False

    def _stage_batch(self, handles: list[LoraHandle]) -> list[None]:
        self.engine.stage(handles)
        return [None] * len(handles)

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
        self.jobs.shutdown()
        self._housekeeper.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        next_poll = time.monotonic() + self.settings.poll_interval
        while not self._stop.is_set():
            timeout = max(0.0, next_poll - time.monotonic())
            if self.slots.has_idle:
                timeout = min(timeout, 0.5)  # versions to retire: look again soon
            hinted = self.watcher.wait(timeout)
            if self._stop.is_set():
                break
            try:
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + self.settings.poll_interval
                    self.sync_once(wait=False)
                else:
                    self.sync_once(only=hinted, wait=False)
            except Exception:  # the loop must survive anything; the next poll retries
                logger.exception("hot-swap controller iteration failed")

    # -- one pass ----------------------------------------------------------------------
    def sync_once(self, only: set[str] | None = None, *, wait: bool = True) -> list[SwapRecord]:
        """Poll the store (or only ``only``), start a job for each adapter that changed,
        retire idle versions, heartbeat. With ``wait``, returns once those jobs are done,
        with their swap records."""
        try:
            changed = self.watcher.poll(only) if only is None or only else set()  # empty: housekeeping only
            if self._store_error is not None:
                logger.warning("hot-swap: store %s is available again", self.store.root)
            self._store_error = None
        except (StoreUnavailableError, OSError) as exc:
            if self._store_error is None:
                logger.error("hot-swap: %s; still serving the last good versions", exc)
            self._store_error = str(exc)
            changed = set()
        with self.lock:
            changed |= self.slots.take_waiting()
        jobs = [self.jobs.submit(adapter) for adapter in sorted(changed)]
        if not wait:
            self._housekeep_soon()
            return []
        done, _ = wait_for(set(jobs))
        records = [record for job in done for record in job.result()]
        self._housekeeping(force_heartbeat=bool(records))
        return records

    def _job_ended(self) -> None:
        self._heartbeat_due = True
        self.watcher.wake()  # the heartbeat, and slots that freed: the controller thread schedules them

    def _housekeep_soon(self) -> None:
        """Run :meth:`_housekeeping` in the housekeeping thread (again, if it runs now)."""
        with self._housekeeping_lock:
            self._housekeeping_wanted = True
            if self._housekeeping_running:
                return
            self._housekeeping_running = True
        self._housekeeper.submit(self._housekeep_while_wanted)

    def _housekeep_while_wanted(self) -> None:
        while True:
            with self._housekeeping_lock:
                if not self._housekeeping_wanted or self._stop.is_set():
                    self._housekeeping_running = False
                    return
                self._housekeeping_wanted = False
            try:
                self._housekeeping()
            except Exception:  # the next pass retries
                logger.exception("hot-swap: housekeeping failed")

    def _housekeeping(self, force_heartbeat: bool = False) -> None:
        with self.lock:
            due = self.slots.due_for_retirement()
            self.slots.forget_released_ids()
        retired = [handle for handle in due if self.retire(handle, min_idle=self.settings.retire_grace)]
        if retired:
            self.outcomes.update_slot_metrics()
        heartbeat_due, self._heartbeat_due = self._heartbeat_due, False
        if (
            force_heartbeat
            or heartbeat_due
            or retired
            or time.time() - self._last_heartbeat >= self.settings.poll_interval
        ):
            self._heartbeat()

    def _sync_adapter(self, adapter: str) -> SwapRecord | None:
        """Bring ``adapter`` to the store's target version (store reads here, no lock)."""
        state = self.slots.state(adapter)
        try:
            if not self.store.adapter_dir(adapter).is_dir():
                if state.current is not None:
                    state.last_error = "adapter directory vanished from the store; still serving the last good version"
                    logger.warning("hot-swap: %s: %s", adapter, state.last_error)
                return None
            if self.store.is_retired(adapter):
                self._retire_adapter(adapter)
                return None
            target = self.store.active_version(adapter)
            newest_seen = max(filter(None, (target, state.current.version if state.current else None)), default=None)
            known_bad = self.store.failed_versions_after(adapter, newest_seen)
        except StoreError as exc:
            state.last_error = str(exc)
            self.watcher.invalidate(adapter)
            return None
        for version, failures in known_bad.items():
            if version not in state.failed:  # refused elsewhere already: not retried here, but reported here too
                self.outcomes.failed(
                    adapter,
                    version,
                    failures[0].phase,
                    f"refused by {failures[0].instance_id}: {failures[0].reason}",
                    {},
                    remember=True,
                    record_in_store=False,
                )
        if target is None or target in state.failed or (state.current is not None and state.current.version == target):
            state.state = "serving" if state.current else "waiting"
            return None
        return self._transact(adapter, target, make_current=True)

    # -- transactions ------------------------------------------------------------------
    def _transact(self, adapter: str, version: str, *, make_current: bool) -> SwapRecord | None:
        """Run one transaction and turn its outcome into a record (None: superseded)."""
        with self.jobs.claim((adapter, version), wait=True):
            state = self.slots.state(adapter)
            with self.lock:
                installed = state.installed.get(version)
                if not make_current and installed is not None:
                    return None  # a transaction that held the claim installed it
                state.state = "swapping"
            tx = SwapTransaction(self, adapter, version, make_current=make_current)
            try:
                tx.run(installed)
            except Superseded as exc:
                logger.info("hot-swap: %s", exc)
                return None
            except (CheckpointRejected, InvalidCheckpointError) as exc:
                reason = exc.reason if isinstance(exc, CheckpointRejected) else str(exc)
                phase = exc.phase if isinstance(exc, CheckpointRejected) else tx.phase
                if make_current:
                    self.jobs.mark_dirty(
                        adapter
                    )  # the job looks again: the store's target is now the last good version
                return self.outcomes.failed(
                    adapter, version, phase, reason, tx.timings, remember=True, record_in_store=True
                )
            except _WAITS as exc:
                return self.outcomes.waits(adapter, version, tx, exc)
            except Exception as exc:  # EngineUnavailable, store or RPC trouble: retried, never recorded
                self.watcher.invalidate(adapter)
                return self.outcomes.failed(
                    adapter,
                    version,
                    tx.phase,
                    f"{type(exc).__name__}: {exc}",
                    tx.timings,
                    remember=False,
                    record_in_store=False,
                )
            finally:
                state.phase = None
            return self.outcomes.served(tx)

    def entered(self, tx: SwapTransaction, phase: str) -> None:
        """A transaction began ``phase`` (shown in status)."""
        self.slots.state(tx.adapter).phase = phase

    def superseded(self, adapter: str, version: str) -> bool:
        """The store has moved ``adapter`` on from ``version`` since its job started."""
        if not self.jobs.is_dirty(adapter):
            return False
        try:
            return self.store.active_version(adapter) != version
        except StoreError:
            return False

    # -- retiring ----------------------------------------------------------------------
    def retire(self, handle: LoraHandle, *, min_idle: float) -> bool:
        """Free the slot of an idle version with no request in flight; False if it is busy,
        was touched within ``min_idle`` seconds, or another transaction holds it."""
        with self.jobs.claim((handle.adapter, handle.version), wait=False) as claimed:
            if not claimed:
                return False
            if self.engine.in_flight(handle):
                self.touch(handle.adapter, handle.version)  # idle counts from when it was last seen in use
                return False
            with self.lock:
                if not self.slots.take_for_retirement(handle, min_idle=min_idle):
                    return False
            self.engine.unroute(handle.adapter, handle.version)
            self.engine.remove(handle)
        logger.info("hotswap retired adapter=%s version=%s", handle.adapter, handle.version)
        self.watcher.wake()  # adapters waiting for a slot
        return True

    def _retire_adapter(self, adapter: str) -> None:
        """The store retired ``adapter``: stop routing it, free slots as requests finish."""
        state = self.slots.state(adapter)
        with self.lock:
            if state.current is None:
                return
            now = time.monotonic()
            for version in state.installed:
                state.idle_since.setdefault(version, now)
            state.current = None
            state.state = "retired"
        self.engine.unroute(adapter, None)
        if self.metrics is not None:
            self.metrics.served(adapter, None)
        self.bus.emit(SwapEvent(kind="retired", adapter=adapter, version=None, instance_id=self.instance_id))

    # -- pinned versions and status ----------------------------------------------------
    def ensure(self, adapter: str, version: str) -> LoraHandle:
        """Install ``adapter@version`` (a retained, non-active version) for a request that pins it.

        Raises:
            NotFoundError: no READY version of that name; CheckpointRejected: it was refused;
            NoCapacity: no slot now; EngineUnavailable: the engine could not install it now.
        """
        state = self.slots.state(adapter)
        with self.lock:
            handle = state.installed.get(version)
            if handle is not None:
                self.slots.touch(adapter, version)
                return handle
            reason = state.failed.get(version)
        if reason is not None:
            raise CheckpointRejected("validate", reason)
        if not self.store.is_ready(adapter, version):
            raise NotFoundError(f"{adapter}@{version}: no such READY version in the store")
        record = self._transact(adapter, version, make_current=False)
        with self.lock:
            handle = state.installed.get(version)
        if handle is not None:
            return handle
        if record is None or record.result == "waiting":
            raise NoCapacity(record.error if record else "no LoRA slot free")
        if version in state.failed:
            raise CheckpointRejected(record.phase or "validate", record.error or "not servable")
        raise EngineUnavailable(record.error or "not installed")

    def touch(self, adapter: str, version: str) -> None:
        """A request used a non-current version: restart its idle clock."""
        with self.lock:
            self.slots.touch(adapter, version)

    @property
    def started_at(self) -> float:
        return self._record.started_at

    def record_weight_version(self, version: str | None) -> None:
        """The engine's base weights were replaced (the served adapters stay installed).
        The heartbeat that tells the store is written by the housekeeping thread."""
        self.weight_version = version
        if self.metrics is not None and version is not None:
            self.metrics.weights(version)
        logger.info("hotswap base weights updated version=%s", version)
        self._heartbeat_due = True
        self.watcher.wake()

    def current(self, adapter: str) -> LoraHandle | None:
        state = self.slots.adapters.get(adapter)
        return state.current if state else None

    def status(self) -> InstanceRecord:
        """A snapshot of every adapter's state; never waits for a swap in progress."""
        with self.lock:
            adapters = {
                name: AdapterServing(
                    served_version=s.current.version if s.current else None,
                    installed_versions=sorted(s.installed),
                    state=s.state,
                    phase=s.phase,
                    last_swap=s.last_swap,
                    last_error=s.last_error,
                )
                for name, s in sorted(self.slots.adapters.items())
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
