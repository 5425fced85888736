"""The swap pipeline against an in-memory engine: scheduling, ordering, undo, waits.

No vLLM process: ``tests/support/fake_engine.py`` stands behind the seam the
pipeline already has (``pipeline/engine_api.py``); the store is a real one on
disk. The real-engine tests cover what these cannot: vLLM itself.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.support.fake_engine import FakeEngine, wait_until
from vllm_lora_hotswap.pipeline.batching import GroupCall
from vllm_lora_hotswap.pipeline.controller import SwapController
from vllm_lora_hotswap.settings import load_settings
from vllm_lora_hotswap.store import CheckpointStore


def controller_for(store: CheckpointStore, engine: FakeEngine, **settings: object) -> SwapController:
    options = {"root": store.root, "events": False, "poll_interval": 3600, "retire_grace": 0, **settings}
    return SwapController(store, engine, load_settings(**options), "test-instance")


def served(controller: SwapController, adapter: str) -> str | None:
    record = controller.status().adapters.get(adapter)  # listed once its job has begun
    return record.served_version if record else None


def phase(controller: SwapController, adapter: str) -> str | None:
    record = controller.status().adapters.get(adapter)
    return record.phase if record else None


def path_of(store: CheckpointStore, adapter: str, version: str) -> str:
    return str(store.version_dir(adapter, version))


def test_eight_adapters_swap_together_with_batched_installs_and_probes(store: CheckpointStore, lora: Path) -> None:
    engine = FakeEngine(install_seconds=0.2)  # a slow step boundary: the others queue behind the first install
    controller = controller_for(store, engine)
    versions = {f"lora{i}": store.publish(f"lora{i}", lora) for i in range(8)}
    records = controller.sync_once()
    assert sorted(r.result for r in records) == ["served"] * 8
    for record in records:  # the stage's own phases, as the engine reported them, beside the pipeline's
        assert {"detect", "validate", "stage", "install", "probe", "switch"} <= set(record.timings)
        assert record.timings["stage_read"] == 0.001 and record.timings["stage_load"] == 0.002
    for adapter, version in versions.items():
        assert served(controller, adapter) == version
        assert engine.served(adapter) == path_of(store, adapter, version)
    assert sum(engine.batches["install"]) == 8 and len(engine.batches["install"]) < 8, engine.batches
    assert sum(engine.batches["probe"]) == 8


@pytest.mark.parametrize("overlap", [False, True])
def test_a_group_call_with_overlap_starts_while_another_runs(overlap: bool) -> None:
    release, groups = threading.Event(), []

    def batch(items: list[int]) -> list[int]:
        groups.append(list(items))
        if len(groups) == 1:
            release.wait(10)
        return [item * 10 for item in items]

    call = GroupCall(batch, overlap=overlap)
    results: dict[int, int] = {}
    first = threading.Thread(target=lambda: results.update({1: call(1)}))
    first.start()
    wait_until(lambda: len(groups) == 1, "the first call")
    others = [threading.Thread(target=lambda i=i: results.update({i: call(i)})) for i in (2, 3)]
    for thread in others:
        thread.start()
    if overlap:  # a call in flight holds no one up: the engine groups what runs together
        wait_until(lambda: sum(map(len, groups)) == 3, "the later calls, while the first runs")
    else:  # they wait for it, then go together
        time.sleep(0.2)
        assert groups == [[1]]
    release.set()
    for thread in (first, *others):
        thread.join(10)
    assert results == {1: 10, 2: 20, 3: 30}
    assert overlap or sorted(groups[1]) == [2, 3]


def test_a_held_stage_holds_up_no_other_adapter_nor_status_nor_pinned_requests(
    store: CheckpointStore, lora: Path
) -> None:
    engine = FakeEngine()
    controller = controller_for(store, engine, retire_grace=60)
    a1 = store.publish("a", lora)
    store.publish("b", lora)
    controller.sync_once()
    a2 = store.publish("a", lora)
    gate = engine.hold_staging(path_of(store, "a", a2))
    controller.sync_once(wait=False)
    wait_until(lambda: phase(controller, "a") == "stage", "a's staging to start")

    assert controller.ensure("a", a1).version == a1  # an installed version answers at once
    b2 = store.publish("b", lora)
    controller.sync_once(only={"b"})  # returns once b's job is done, while a's still stages
    assert served(controller, "b") == b2
    assert controller.status().adapters["a"].state == "swapping" and served(controller, "a") == a1

    gate.set()
    wait_until(lambda: served(controller, "a") == a2, "a to serve its new version")
    assert engine.served("a") == path_of(store, "a", a2)


def test_a_superseded_version_is_never_installed(store: CheckpointStore, lora: Path) -> None:
    engine = FakeEngine()
    controller = controller_for(store, engine)
    store.publish("a", lora)
    controller.sync_once()
    v2 = store.publish("a", lora)
    gate = engine.hold_staging(path_of(store, "a", v2))
    controller.sync_once(wait=False)
    wait_until(lambda: phase(controller, "a") == "stage", "v2's staging to start")
    v3 = store.publish("a", lora)
    controller.sync_once(wait=False)  # the running job is told the store moved on
    gate.set()
    wait_until(lambda: served(controller, "a") == v3 and controller.status().adapters["a"].state == "serving", "v3")
    assert path_of(store, "a", v2) not in engine.installed_paths
    assert not any(path == path_of(store, "a", v2) for _, path in engine.staged), "v2's staged copy was dropped"
    assert store.failures("a", v2) == []


@pytest.mark.parametrize("mode", ["versioned", "inplace"])
@pytest.mark.parametrize("phase", ["stage", "install", "probe"])
def test_a_version_rejected_at_any_phase_is_undone_and_recorded(
    store: CheckpointStore, lora: Path, phase: str, mode: str
) -> None:
    engine = FakeEngine(max_cpu_loras=3)
    controller = controller_for(store, engine, mode=mode)
    v1 = store.publish("a", lora)
    controller.sync_once()
    v2 = store.publish("a", lora)
    engine.reject[phase].add(path_of(store, "a", v2))
    (record,) = controller.sync_once()
    assert (record.result, record.phase) == ("failed", phase)
    assert [f.phase for f in store.failures("a", v2)] == [phase]  # a verdict on the version: every engine skips it
    assert served(controller, "a") == v1 and engine.served("a") == path_of(store, "a", v1)
    assert sorted(engine.slots.values()) == [path_of(store, "a", v1)] and not engine.staged
    # Nothing leaked: the two other slots are free for other adapters.
    store.publish("b", lora), store.publish("c", lora)
    assert [r.result for r in controller.sync_once()] == ["served", "served"]


@pytest.mark.parametrize("call", ["stage", "stage_status", "install", "probe"])
def test_an_engine_that_cannot_answer_is_no_verdict_on_the_version(
    store: CheckpointStore, lora: Path, call: str
) -> None:
    """The worker dies, the engine is paused for a base-weight update, an RPC times out:
    nothing is recorded against the version, and it is served once the engine is back."""
    engine = FakeEngine()
    controller = controller_for(store, engine)
    v1 = store.publish("a", lora)
    controller.sync_once()
    v2 = store.publish("a", lora)
    engine.unavailable.add(call)
    (record,) = controller.sync_once()
    assert record.result == "failed" and "EngineUnavailable" in (record.error or "")
    assert store.failures("a", v2) == [] and served(controller, "a") == v1
    assert not engine.staged and sorted(engine.slots.values()) == [path_of(store, "a", v1)]
    engine.unavailable.clear()
    assert [r.result for r in controller.sync_once()] == ["served"]
    assert served(controller, "a") == v2


def test_an_adapter_without_a_slot_waits_without_rereading_and_goes_on_when_one_frees(
    store: CheckpointStore, lora: Path
) -> None:
    engine = FakeEngine(max_cpu_loras=2)
    controller = controller_for(store, engine)
    store.publish("a", lora), store.publish("b", lora)
    controller.sync_once()
    c1 = store.publish("c", lora)
    (record,) = controller.sync_once()
    assert record.result == "waiting" and controller.status().adapters["c"].state == "no-slot"
    assert controller.sync_once() == []  # nothing changed, no slot freed: not tried again
    store.retire("a")
    controller.sync_once()  # a stops being routed; its version is idle and leaves
    assert [r.result for r in controller.sync_once()] == ["served"]
    assert served(controller, "c") == c1 and len(engine.slots) == 2


def test_a_pinned_version_in_use_is_staged_once_and_leaves_when_unused(store: CheckpointStore, lora: Path) -> None:
    engine = FakeEngine()
    controller = controller_for(store, engine, retire_grace=0.3)
    v1 = store.publish("a", lora)
    store.publish("a", lora)
    controller.sync_once()
    controller.ensure("a", v1)
    deadline = time.monotonic() + 1.2  # four times retire_grace, a request every 0.1 s
    while time.monotonic() < deadline:
        controller.touch("a", v1)  # what the server does for a request naming a routed a@v1
        controller.sync_once()
        assert controller.ensure("a", v1).version == v1
        time.sleep(0.1)
    assert engine.stage_starts[path_of(store, "a", v1)] == 1
    time.sleep(0.35)
    controller.sync_once()
    assert v1 not in controller.status().adapters["a"].installed_versions and "a@" + v1 not in engine.routes


def test_concurrent_requests_pinning_one_version_install_it_once(store: CheckpointStore, lora: Path) -> None:
    engine = FakeEngine()
    controller = controller_for(store, engine, retire_grace=60)
    v1 = store.publish("a", lora)
    store.publish("a", lora)
    controller.sync_once()
    handles = []
    threads = [threading.Thread(target=lambda: handles.append(controller.ensure("a", v1))) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({h.lora_id for h in handles}) == 1 and len(handles) == 6
    assert engine.stage_starts[path_of(store, "a", v1)] == 1


def test_status_does_not_wait_for_a_swap(store: CheckpointStore, lora: Path) -> None:
    engine = FakeEngine()
    controller = controller_for(store, engine)
    v1 = store.publish("a", lora)
    gate = engine.hold_staging(path_of(store, "a", v1))
    controller.sync_once(wait=False)
    wait_until(lambda: phase(controller, "a") == "stage", "staging to start")
    with controller.lock:  # the lock is free: no transaction holds it while it stages
        pass
    gate.set()
    wait_until(lambda: served(controller, "a") == v1, "v1 to be served")


def test_a_job_that_raises_does_not_wedge_its_adapter() -> None:
    from vllm_lora_hotswap.pipeline.jobs import AdapterJobs

    calls = []

    def work(adapter: str) -> str:
        calls.append(adapter)
        if len(calls) == 1:
            raise RuntimeError("store hiccup")
        return "done"

    jobs: AdapterJobs[str] = AdapterJobs(work, 2, on_idle=lambda: None)
    assert jobs.submit("a").result(10) == []
    assert jobs.submit("a").result(10) == ["done"]  # a new job ran: the first one ended
    jobs.shutdown()


# -- random sequences ------------------------------------------------------------------
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule  # noqa: E402

ADAPTERS = ("a", "b", "c")


class PipelineMachine(RuleBasedStateMachine):
    """Random publish / pin / follow / bad-version / engine-down / pinned-request sequences.

    After every sync with the engine up, each adapter serves the store's target, or
    its last good version when the target was refused; slots never exceed capacity;
    no name is routed to weights that are not in their slot."""

    mode = "versioned"
    lora: Path

    @initialize()
    def setup(self) -> None:
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="pipeline-machine-"))
        self.store = CheckpointStore(root)
        self.engine = FakeEngine(max_cpu_loras=len(ADAPTERS) + 1)
        self.controller = controller_for(self.store, self.engine, mode=self.mode)

    @rule(adapter=st.sampled_from(ADAPTERS), rejected_at=st.sampled_from([None, None, "stage", "install", "probe"]))
    def publish(self, adapter: str, rejected_at: str | None) -> None:
        version = self.store.publish(adapter, self.lora)
        if rejected_at is not None:
            self.engine.reject[rejected_at].add(path_of(self.store, adapter, version))

    @rule(adapter=st.sampled_from(ADAPTERS), data=st.data())
    def pin(self, adapter: str, data: st.DataObject) -> None:
        versions = self.store.versions(adapter)
        if versions:
            self.store.pin(adapter, data.draw(st.sampled_from(versions)))

    @rule(adapter=st.sampled_from(ADAPTERS))
    def follow(self, adapter: str) -> None:
        if self.store.adapter_dir(adapter).is_dir():
            self.store.follow(adapter)

    @rule(call=st.sampled_from([None, "stage", "install", "probe"]))
    def engine_trouble(self, call: str | None) -> None:
        self.engine.unavailable = {call} if call else set()

    @rule(adapter=st.sampled_from(ADAPTERS), data=st.data())
    def request_a_pinned_version(self, adapter: str, data: st.DataObject) -> None:
        versions = self.store.versions(adapter)
        if not versions:
            return
        version = data.draw(st.sampled_from(versions))
        try:
            handle = self.controller.ensure(adapter, version)
        except Exception:  # refused, no slot, engine trouble: the request gets an error
            return
        assert self.engine.slots.get(handle.lora_id) == handle.path

    @precondition(lambda self: hasattr(self, "controller"))
    @rule()
    def sync(self) -> None:
        before = {a: s.current.version if s.current else None for a, s in self.controller.slots.adapters.items()}
        self.controller.sync_once()
        if self.engine.unavailable:
            return
        for adapter in ADAPTERS:
            if not self.store.adapter_dir(adapter).is_dir():
                continue
            target = self.store.active_version(adapter)
            refused = target is not None and bool(self.store.failures(adapter, target))
            expected = before.get(adapter) if refused or target is None else target
            assert served(self.controller, adapter) == expected, (adapter, target, refused)

    @invariant()
    def slots_and_routes_agree(self) -> None:
        if not hasattr(self, "controller"):
            return
        assert len(self.engine.slots) <= self.engine.max_cpu_loras
        for name, handle in self.engine.routes.items():
            assert self.engine.slots.get(handle.lora_id) == handle.path, f"{name} is routed to weights not in its slot"
        for state in self.controller.slots.adapters.values():
            if state.current is not None:
                assert self.engine.served(state.current.adapter) == state.current.path


class InPlaceMachine(PipelineMachine):
    mode = "inplace"


@pytest.mark.parametrize("machine", [PipelineMachine, InPlaceMachine], ids=["versioned", "inplace"])
def test_random_sequences_keep_the_invariants(machine: type[PipelineMachine], lora: Path) -> None:
    machine.lora = lora
    test = machine.TestCase()
    test.settings = settings(
        max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    test.runTest()


@pytest.mark.parametrize("outcome", ["served", "probe rejected", "engine down"])
def test_requests_wait_during_the_probe_and_go_where_the_verdict_routes_them(
    store: CheckpointStore, lora: Path, outcome: str
) -> None:
    """Requests for the adapter that arrive during the probe are held: after a passing probe
    they go to the new version (released after the route), after a failing one to the old."""
    engine = FakeEngine()
    controller = controller_for(store, engine)
    v1 = store.publish("a", lora)
    controller.sync_once()
    engine.hold_log.clear()
    v2 = store.publish("a", lora)
    if outcome == "probe rejected":
        engine.reject["probe"].add(path_of(store, "a", v2))
    elif outcome == "engine down":
        engine.unavailable.add("probe")
    controller.sync_once()
    expected = v2 if outcome == "served" else v1
    assert [(kind, adapter) for kind, adapter, _ in engine.hold_log] == [("hold", "a"), ("release", "a")]
    assert engine.hold_log[0][2].version == v1  # held while v1 serves...
    assert engine.hold_log[1][2].version == expected  # ...let go once the routes say where to
    assert engine.requests_held == set()


def test_a_pinned_version_holds_no_request_of_the_adapter(store: CheckpointStore, lora: Path) -> None:
    engine = FakeEngine()
    controller = controller_for(store, engine)
    v1 = store.publish("a", lora)
    store.publish("a", lora)
    controller.sync_once()
    engine.hold_log.clear()
    controller.ensure("a", v1)  # a request naming a@v1: the bare name keeps its route
    assert engine.hold_log == []


@pytest.mark.parametrize("outcome", ["served", "probe rejected", "engine down"])
def test_sample_requests_pinning_the_version_may_start_during_its_probe(
    store: CheckpointStore, lora: Path, outcome: str
) -> None:
    """The version is open to pinned sample requests from before its probe until its verdict:
    closed as passed only once it is routed, as failed when it will not be served (their
    answers are then withheld and their generations ended before its slot is freed)."""
    engine = FakeEngine()
    controller = controller_for(store, engine)
    store.publish("a", lora)
    controller.sync_once()
    engine.sampling_log.clear()
    v2 = store.publish("a", lora)
    if outcome == "probe rejected":
        engine.reject["probe"].add(path_of(store, "a", v2))
    elif outcome == "engine down":
        engine.unavailable.add("probe")
    controller.sync_once()
    closed = "passed" if outcome == "served" else "failed"
    assert engine.sampling_log == [("open", f"a@{v2}"), (closed, f"a@{v2}")]
    assert engine.sampling_open == set()
    if outcome == "served":
        assert engine.routes[f"a@{v2}"].version == v2  # routed before it was closed as passed
    else:
        assert f"a@{v2}" not in engine.routes
