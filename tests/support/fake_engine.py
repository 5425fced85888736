"""An in-memory engine behind the pipeline's seam (``pipeline/engine_api.py``).

It keeps what a vLLM engine keeps (slots by id, staged copies, routes,
requests in flight) and counts every call, with knobs to fail a phase for a
version, hold a version's staging, or take the whole engine down. The
pipeline's logic runs against it in milliseconds, with no vLLM process.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

from vllm_lora_hotswap.pipeline.engine_api import (
    CheckpointRejected,
    EngineLimits,
    EngineUnavailable,
    InstallRequest,
    LoraHandle,
    NoCapacity,
    StageStatus,
)


class FakeEngine:
    probes_overlap = False

    def __init__(self, max_cpu_loras: int = 8, *, install_seconds: float = 0.0):
        self.max_cpu_loras = max_cpu_loras
        self.install_seconds = install_seconds  # a slow step boundary lets concurrent installs queue up
        self.slots: dict[int, str] = {}  # lora_id -> path of the weights it holds
        self.previous: dict[int, str] = {}  # in-place installs, for restore
        self.staged: set[tuple[int, str]] = set()
        self.routes: dict[str, LoraHandle] = {}
        self.requests: Counter[str] = Counter()  # served name -> requests in flight
        self.calls: Counter[str] = Counter()
        self.batches: dict[str, list[int]] = {"install": [], "probe": [], "stage": []}
        self.stage_starts: Counter[str] = Counter()  # path -> times staged
        self.installed_paths: list[str] = []  # every path ever installed, in order
        self.reject: dict[str, set[str]] = {"stage": set(), "install": set(), "probe": set()}  # phase -> paths
        self.held: dict[str, threading.Event] = {}  # path -> set to let its staging finish
        self.requests_held: set[str] = set()  # adapters whose new requests wait for a probe's verdict
        self.hold_log: list[tuple[str, str, LoraHandle | None]] = []  # (hold | release, adapter, its route then)
        self.sampling_open: set[str] = set()  # served names sample requests may pin during their probe
        self.sampling_log: list[tuple[str, str]] = []  # (open | passed | failed, served name)
        self.down = False  # every call that needs the engine raises EngineUnavailable
        self.unavailable: set[str] = set()  # only these calls do ("stage", "install", "probe", ...)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    # -- knobs -------------------------------------------------------------------------
    def hold_staging(self, path: str) -> threading.Event:
        gate = self.held[path] = threading.Event()
        return gate

    def _check_up(self, call: str) -> None:
        self.calls[call] += 1
        if self.down or call in self.unavailable:
            raise EngineUnavailable(f"{call}: engine is down")

    # -- EngineAdapter -----------------------------------------------------------------
    def limits(self) -> EngineLimits:
        return EngineLimits(max_lora_rank=64, max_loras=2, max_cpu_loras=self.max_cpu_loras, base_models=())

    def new_lora_id(self) -> int:
        return next(self._ids)

    def stage(self, handles: Sequence[LoraHandle]) -> None:
        self._check_up("stage")
        self.batches["stage"].append(len(handles))
        with self._lock:
            for handle in handles:
                self.staged.add((handle.lora_id, handle.path))
                self.stage_starts[handle.path] += 1

    def stage_status(self, handles: Sequence[LoraHandle]) -> list[StageStatus]:
        self._check_up("stage_status")
        statuses = []
        for handle in handles:
            gate = self.held.get(handle.path)
            if (handle.lora_id, handle.path) not in self.staged:
                statuses.append(StageStatus("failed", "not staged"))
            elif handle.path in self.reject["stage"]:
                statuses.append(StageStatus("failed", "ValueError: LoRA weights hold NaN or inf"))
            elif gate is not None and not gate.is_set():
                statuses.append(StageStatus("pending"))
            else:
                statuses.append(StageStatus("ready", nbytes=1000, timings={"stage_read": 0.001, "stage_load": 0.002}))
        return statuses

    def wait_staged(self, handle: LoraHandle, timeout: float) -> None:
        gate = self.held.get(handle.path)
        if gate is not None:
            gate.wait(timeout)

    def install(self, requests: Sequence[InstallRequest]) -> list[float | Exception]:
        self._check_up("install")
        self.batches["install"].append(len(requests))
        time.sleep(self.install_seconds)
        results: list[float | Exception] = []
        with self._lock:
            for request in requests:
                handle = request.handle
                if (handle.lora_id, handle.path) not in self.staged:
                    results.append(CheckpointRejected("install", "not staged"))
                elif handle.path in self.reject["install"]:
                    results.append(CheckpointRejected("install", "shape mismatch"))
                elif (
                    request.replace is None
                    and handle.lora_id not in self.slots
                    and len(self.slots) >= self.max_cpu_loras
                ):
                    results.append(NoCapacity(f"all {self.max_cpu_loras} slots in use"))
                else:
                    if request.replace is not None:
                        self.previous[handle.lora_id] = self.slots[handle.lora_id]
                    self.slots[handle.lora_id] = handle.path
                    self.staged.discard((handle.lora_id, handle.path))
                    self.installed_paths.append(handle.path)
                    results.append(self.install_seconds)
        return results

    def commit(self, handle: LoraHandle) -> None:
        self.calls["commit"] += 1
        self.previous.pop(handle.lora_id, None)

    def restore(self, handle: LoraHandle) -> None:
        self.calls["restore"] += 1
        self.slots[handle.lora_id] = self.previous.pop(handle.lora_id)

    def probe(self, handles: Sequence[LoraHandle]) -> list[Exception | None]:
        self.calls["probe"] += 1
        self.batches["probe"].append(len(handles))
        verdicts: list[Exception | None] = []
        for handle in handles:
            if self.down or "probe" in self.unavailable:
                verdicts.append(EngineUnavailable("EngineDeadError: the engine core died"))
            elif self.slots.get(handle.lora_id) != handle.path:
                verdicts.append(CheckpointRejected("probe", f"{handle.served_name} is not in its slot"))
            elif handle.path in self.reject["probe"]:
                verdicts.append(CheckpointRejected("probe", "non-finite logprobs [nan]"))
            else:
                verdicts.append(None)
        return verdicts

    def route(self, handle: LoraHandle, *, current: bool) -> None:
        self.routes[f"{handle.adapter}@{handle.version}"] = handle
        if current:
            self.routes[handle.adapter] = handle

    def hold_requests(self, adapter: str) -> None:
        self.requests_held.add(adapter)
        self.hold_log.append(("hold", adapter, self.routes.get(adapter)))

    def release_requests(self, adapter: str) -> None:
        if adapter in self.requests_held:
            self.requests_held.discard(adapter)
            self.hold_log.append(("release", adapter, self.routes.get(adapter)))

    def open_for_sampling(self, handle: LoraHandle) -> None:
        self.sampling_open.add(handle.served_name)
        self.sampling_log.append(("open", handle.served_name))

    def close_for_sampling(self, handle: LoraHandle, *, passed: bool) -> None:
        self.sampling_open.discard(handle.served_name)
        self.sampling_log.append(("passed" if passed else "failed", handle.served_name))

    def unroute(self, adapter: str, version: str | None) -> None:
        self.routes.pop(adapter if version is None else f"{adapter}@{version}", None)

    def in_flight(self, handle: LoraHandle) -> int:
        return self.requests[handle.served_name]

    def remove(self, handle: LoraHandle) -> None:
        self.calls["remove"] += 1
        with self._lock:
            self.staged.discard((handle.lora_id, handle.path))
            if self.slots.get(handle.lora_id) == handle.path:
                del self.slots[handle.lora_id]

    # -- what tests check --------------------------------------------------------------
    def served(self, name: str) -> str | None:
        """The path of the weights a request naming ``name`` would run on."""
        handle = self.routes.get(name)
        return None if handle is None else self.slots.get(handle.lora_id)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)
