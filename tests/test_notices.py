"""Detection without waiting: inotify hints at once, a publisher's notice makes an engine look
(never trust), and a rollout waits on the engines' answer instead of polling them.

No vLLM: the routes run in FastAPI's test client over a real pipeline with the in-memory
engine (``tests/support/fake_engine.py``) and a real store on disk; the publisher side talks
to small HTTP servers on 127.0.0.1. ``test_notices_engine.py`` does the same against vLLM.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.support.fake_engine import FakeEngine, wait_until
from trl_callbacks import FleetRollout, HotSwapCallback, Publication
from vllm_lora_hotswap import inotify
from vllm_lora_hotswap.engine import notices
from vllm_lora_hotswap.notify import CommitNotifier
from vllm_lora_hotswap.pipeline.controller import SwapController
from vllm_lora_hotswap.settings import load_settings
from vllm_lora_hotswap.store import CheckpointStore
from vllm_lora_hotswap.watcher import MAX_HINTS, StoreWatcher
from vllm_lora_hotswap.weights.routes import api_key_hashes

FORGED = "2099-01-01T00-00-00Z"


def served(controller: SwapController, adapter: str) -> str | None:
    current = controller.current(adapter)
    return current.version if current else None


# -- the watcher ---------------------------------------------------------------------------
needs_inotify = pytest.mark.skipif(not inotify.available(), reason="inotify is Linux-only")


def hints_until(watcher: StoreWatcher, adapter: str, timeout: float = 10) -> set[str]:
    hinted: set[str] = set()
    deadline = time.monotonic() + timeout
    while adapter not in hinted and time.monotonic() < deadline:
        hinted |= watcher.wait(0.5)
    return hinted


@needs_inotify
def test_inotify_hints_the_commit_itself_and_a_new_adapters_first_version(store: CheckpointStore, lora: Path) -> None:
    store.publish("a", lora)
    watcher = StoreWatcher(store, lambda _: True, poll_interval=3600.0, events=True)
    watcher.poll()
    stop = threading.Event()
    watcher.start_events(stop)
    try:
        assert "a" in hints_until(watcher, "a")  # watching a directory hints it once (a commit may have raced)
        assert watcher.poll({"a"}) == set()
        # The commit is the version directory's rename: the hint that follows it sees the change.
        version = store.publish("a", lora)
        assert "a" in hints_until(watcher, "a")
        assert watcher.poll({"a"}) == {"a"}
        assert store.active_version("a") == version
        # A new adapter: the root's event names it; once polled, its directory is watched too.
        store.publish("b", lora)
        assert "b" in hints_until(watcher, "b")
        assert watcher.poll({"b"}) == {"b"}
        hints_until(watcher, "b")  # the new watch's own hint
        store.publish("b", lora)
        assert "b" in hints_until(watcher, "b")
        assert watcher.poll({"b"}) == {"b"}
    finally:
        stop.set()


@needs_inotify
def test_inotify_ignores_dot_files_and_staging(store: CheckpointStore, lora: Path) -> None:
    store.publish("a", lora)
    watcher = StoreWatcher(store, lambda _: True, poll_interval=3600.0, events=True)
    watcher.poll()
    stop = threading.Event()
    watcher.start_events(stop)
    try:
        hints_until(watcher, "a")
        (store.adapter_dir("a") / ".staging").mkdir(exist_ok=True)
        (store.adapter_dir("a") / ".scratch").write_text("x")
        (store.root / ".instances").mkdir(exist_ok=True)
        assert watcher.wait(0.5) == set()
        (store.adapter_dir("a") / "ACTIVE").write_text("x")  # a name that matters
        assert "a" in hints_until(watcher, "a")
    finally:
        stop.set()


def test_hints_are_bounded_and_unknown_names_leave_nothing_behind(store: CheckpointStore, lora: Path) -> None:
    store.publish("a", lora)
    watcher = StoreWatcher(store, lambda _: True, poll_interval=3600.0, events=False)
    assert watcher.poll() == {"a"}
    assert watcher.hint(f"ghost{i}" for i in range(MAX_HINTS - 1))
    assert watcher.hint(["a"])
    assert not watcher.hint(["one-too-many"])  # dropped: the set is full
    hinted = watcher.wait(0)
    assert len(hinted) == MAX_HINTS and "a" in hinted
    assert watcher.poll(hinted) == set()  # nothing changed; no ghost is remembered
    assert watcher.hint(["after-draining"])


# -- the engine's routes over a real pipeline ----------------------------------------------
def make_app(store: CheckpointStore, key: str | None = None, **settings: Any) -> tuple[TestClient, SwapController]:
    options = {"root": store.root, "events": False, "poll_interval": 3600, "retire_grace": 0, **settings}
    controller = SwapController(store, FakeEngine(), load_settings(**options), "test-instance")
    app = FastAPI()
    app.include_router(notices.notify_router)
    app.include_router(notices.wait_router)
    app.state.lora_hotswap = controller
    app.state.lora_hotswap_key_hashes = api_key_hashes(SimpleNamespace(api_key=[key] if key else None))
    return TestClient(app), controller


@pytest.fixture
def routes(store: CheckpointStore, lora: Path) -> Iterator[tuple[TestClient, SwapController, str]]:
    """The routes over a running pipeline that never polls (3600 s) and has no file events."""
    first = store.publish("policy", lora)
    client, controller = make_app(store)
    controller.start()
    assert served(controller, "policy") == first
    with client:
        yield client, controller, first
    controller.stop()


def test_a_notice_makes_the_engine_read_the_store_at_once(routes, store: CheckpointStore, lora: Path) -> None:
    client, controller, first = routes
    second = store.publish("policy", lora)
    assert served(controller, "policy") == first  # no poll for an hour, no events: nothing moves by itself
    response = client.post("/v1/lora/notify", json={"adapter": "policy", "version": second})
    assert response.status_code == 202 and response.json() == {"accepted": True}
    wait_until(lambda: served(controller, "policy") == second, "the notified version to be served")
    # The same notice again: it serves that version already, nothing to look at.
    assert client.post("/v1/lora/notify", json={"adapter": "policy", "version": second}).json() == {"accepted": False}


def test_a_forged_notice_changes_nothing(routes, store: CheckpointStore) -> None:
    client, controller, first = routes
    before = controller.status().adapters
    for body in (
        {"adapter": "policy", "version": FORGED},
        {"adapter": "ghost", "version": FORGED},
        {"adapter": "policy"},
    ):
        assert client.post("/v1/lora/notify", json=body).status_code == 202
    time.sleep(0.2)  # the controller thread has looked (or would have)
    assert served(controller, "policy") == first
    assert controller.status().adapters == before  # no swap, no error, no new adapter
    assert "ghost" not in controller.slots.adapters
    for bad in ({"adapter": "../etc", "version": None}, {"adapter": "policy", "version": "latest"}):
        assert client.post("/v1/lora/notify", json=bad).status_code == 400


def test_a_written_notice_is_checked_and_needs_an_engine_that_reads_ahead(routes, store: CheckpointStore) -> None:
    client, controller, first = routes
    written = {"staging": "0" * 32, "sha256": "a" * 64, "size": 10}
    both = {"adapter": "policy", "version": first, "written": written}
    assert "not both" in client.post("/v1/lora/notify", json=both).json()["error"]["message"]
    for bad in ({"staging": "../../x" + "0" * 25}, {"sha256": "A" * 64}, {"size": 0}, {"extra": 1}):
        body = {"adapter": "policy", "written": {**written, **bad}}
        assert client.post("/v1/lora/notify", json=body).status_code == 422, bad
    # The in-memory engine cannot read ahead: accepted is False, and nothing else happens.
    assert client.post("/v1/lora/notify", json={"adapter": "policy", "written": written}).json() == {"accepted": False}
    calls: list[tuple[str, str, int]] = []
    controller.engine.read_ahead = lambda *args: calls.append(args) or True
    assert client.post("/v1/lora/notify", json={"adapter": "policy", "written": written}).json() == {"accepted": True}
    staging = store.adapter_dir("policy") / ".staging" / written["staging"] / "adapter_model.safetensors"
    assert calls[-1] == (str(staging), written["sha256"], 10)
    assert served(controller, "policy") == first


def test_notices_for_adapters_served_elsewhere_are_dropped(store: CheckpointStore, lora: Path) -> None:
    store.publish("mine", lora)
    client, controller = make_app(store, adapters="mine")
    with client:
        assert client.post("/v1/lora/notify", json={"adapter": "theirs"}).json() == {"accepted": False}
        assert client.post("/v1/lora/notify", json={"adapter": "mine"}).json() == {"accepted": True}
    assert controller.watcher.wait(0) == {"mine"}


def test_the_routes_need_the_servers_api_key(store: CheckpointStore) -> None:
    client, _ = make_app(store, key="secret")
    body = {"adapter": "policy", "version": FORGED}
    with client:
        assert client.post("/v1/lora/notify", json=body).status_code == 401
        assert client.post("/v1/lora/notify", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert client.get("/v1/lora/wait", params={"adapter": "policy", "version": FORGED}).status_code == 401
        keyed = client.post("/v1/lora/notify", json=body, headers={"Authorization": "Bearer secret"})
        assert keyed.status_code == 202


def test_the_wait_route_answers_when_the_version_is_served(routes, store: CheckpointStore, lora: Path) -> None:
    client, controller, first = routes
    now = client.get("/v1/lora/wait", params={"adapter": "policy", "version": first, "timeout": 30}).json()
    assert now["reached"] and now["served_version"] == first  # served already: at once
    missing = client.get("/v1/lora/wait", params={"adapter": "policy", "version": FORGED, "timeout": 0.2}).json()
    assert not missing["reached"] and missing["served_version"] == first
    second = store.publish("policy", lora)
    threading.Timer(0.3, controller.watcher.hint, args=(["policy"],)).start()
    answer = client.get("/v1/lora/wait", params={"adapter": "policy", "version": second, "timeout": 30}).json()
    assert answer["reached"] and answer["served_version"] == second  # woken by the swap, long before 30 s
    assert client.app.state.lora_hotswap_waits._waiting == {}  # nothing left behind


# -- the publisher's side --------------------------------------------------------------------
class FakeEngineServer:
    """An HTTP server on 127.0.0.1 answering the routes a publisher and a rollout use."""

    def __init__(self, *, wait_route: bool = True, refuse_written: bool = False, hold_written: bool = False):
        self.notices: list[tuple[dict[str, Any], str | None]] = []
        self.refuse_written = refuse_written  # as an older plugin, whose notice model forbids "written"
        self.written_released = threading.Event()  # a slow engine: written notices answered once set
        if not hold_written:
            self.written_released.set()
        self.requests: list[str] = []
        self.served: str | None = None
        self.probing: str | None = None  # a version open to pinned samples while its probe runs (it fails)
        self.sampled: list[str] = []  # model_id of each sample request
        self.changed = threading.Condition()
        self.wait_route = wait_route
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if urlparse(self.path).path == "/api/v1/sample":
                    owner.sampled.append(body["model_id"])
                    if owner.probing is not None and body["model_id"].endswith(f"@{owner.probing}"):
                        owner.probing = None  # its probe failed: the batch is refused, never answered
                        self._answer(409, {"error": {"message": f"{body['model_id']} did not pass its probe"}})
                        return
                    version = body["model_id"].split("@")[1]
                    samples = [{"token_ids": [1], "logprobs": [-0.5], "version": version} for _ in body["prompts"]]
                    self._answer(200, {"samples": samples})
                    return
                owner.notices.append((body, self.headers.get("Authorization")))
                if "written" in body:
                    owner.written_released.wait(30)
                if owner.refuse_written and "written" in body:
                    self._answer(
                        422, {"detail": [{"msg": "Extra inputs are not permitted", "loc": ["body", "written"]}]}
                    )
                    return
                self._answer(202, {"accepted": True})

            def do_GET(self) -> None:  # noqa: N802
                url = urlparse(self.path)
                owner.requests.append(url.path)
                if url.path == "/v1/lora/adapters":
                    self._answer(200, {"adapters": {"policy": {"served_version": owner.served, "last_error": None}}})
                elif url.path == "/v1/lora/wait" and owner.wait_route:
                    query = {k: v[0] for k, v in parse_qs(url.query).items()}
                    if query.get("sampling") == "true" and owner.probing == query["version"]:
                        self._answer(200, {"served_version": owner.served, "sampling": True, "last_error": None})
                        return
                    with owner.changed:
                        owner.changed.wait_for(
                            lambda: (owner.served or "") >= query["version"], float(query["timeout"])
                        )
                    self._answer(200, {"served_version": owner.served, "last_error": None})
                else:
                    self._answer(404, {"detail": "Not Found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serve(self, version: str) -> None:
        with self.changed:
            self.served = version
            self.changed.notify_all()

    def close(self) -> None:
        self.written_released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_engines() -> Iterator[Callable[..., FakeEngineServer]]:
    made: list[FakeEngineServer] = []

    def make(**kwargs: Any) -> FakeEngineServer:
        made.append(FakeEngineServer(**kwargs))
        return made[-1]

    yield make
    for server in made:
        server.close()


def test_the_notifier_never_blocks_or_raises_and_sends_the_key(fake_engines, caplog) -> None:
    engine = fake_engines()
    notifier = CommitNotifier([engine.url, "http://127.0.0.1:9"], api_key="secret", timeout=1.0)
    futures = notifier.notify("policy", "2025-01-01T00-00-00Z")
    assert [f.result(10) for f in futures] == [True, False]  # the unreachable one: logged, reported, not raised
    assert engine.notices == [({"adapter": "policy", "version": "2025-01-01T00-00-00Z"}, "Bearer secret")]
    assert "http://127.0.0.1:9 failed" in caplog.text
    notifier.close()


def test_the_callback_notifies_its_engines_of_each_save_and_each_commit(
    tmp_path: Path, toy_model: Path, fake_engines
) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainerState

    engine = fake_engines()
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(toy_model, dtype=torch.float32),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    hotswap = HotSwapCallback(
        tmp_path / "store", "policy", on_improvement=False, every_n_steps=1, engines=[engine.url]
    )
    hotswap.publish(TrainerState(global_step=1), model)
    (publication,) = hotswap.publications
    assert hotswap.wait_for_commit(publication, 60) and publication.version is not None, publication.error
    wait_until(lambda: len(engine.notices) == 2, "the notices")
    # First the weight file written (before the commit: the engines read it meanwhile), then the commit.
    (written, _), (committed, _) = engine.notices
    manifest = json.loads((hotswap.store.version_dir("policy", publication.version) / "READY").read_text())
    weights = manifest["files"]["adapter_model.safetensors"]
    assert written["adapter"] == "policy" and set(written) == {"adapter", "written"}
    assert (written["written"]["sha256"], written["written"]["size"]) == (weights["sha256"], weights["size"])
    assert len(written["written"]["staging"]) == 32
    assert committed == {"adapter": "policy", "version": publication.version}


def test_a_slow_answer_to_a_written_notice_never_delays_the_commits_notice(fake_engines) -> None:
    """The engine holds its answer to the written notice; the commit's notice, sent after it,
    is still sent and answered meanwhile (it does not queue behind the written one)."""
    engine = fake_engines(hold_written=True)
    notifier = CommitNotifier([engine.url], timeout=30.0)
    staged = SimpleNamespace(path=Path("0" * 32), weights_digest=SimpleNamespace(sha256="a" * 64, size=10))
    [written] = notifier.notify_written("policy", staged)
    [committed] = notifier.notify("policy", "2025-01-01T00-00-00Z")
    assert committed.result(10) is True
    assert not written.done()  # still held by the engine
    engine.written_released.set()
    assert written.result(10) is True
    # Both arrived; in which order is up to the two senders' threads.
    assert sorted("written" in body for body, _ in engine.notices) == [False, True]
    notifier.close()


def test_an_engine_that_refuses_written_notices_still_gets_every_commit(
    tmp_path: Path, toy_model: Path, fake_engines
) -> None:
    """An engine without reads ahead (an older plugin answers 422) costs the publisher nothing: the
    publications commit, each commit is notified, and written notices to it stop after its first
    refusal."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainerState

    older = fake_engines(refuse_written=True)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(toy_model, dtype=torch.float32),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    hotswap = HotSwapCallback(tmp_path / "store", "policy", on_improvement=False, every_n_steps=1, engines=[older.url])
    for step in (1, 2, 3):
        hotswap.publish(TrainerState(global_step=step), model)
        publication = hotswap.publications[-1]
        assert hotswap.wait_for_commit(publication, 60) and publication.version is not None, publication.error
        wait_until(lambda v=publication.version: any(b.get("version") == v for b, _ in older.notices), "its notice")
    assert not hotswap.errors
    kinds = ["written" if "written" in body else body["version"] for body, _ in older.notices]
    versions = [p.version for p in hotswap.publications]
    assert kinds == ["written", *versions]  # refused once, then only the commits' notices


def rollout_for(tmp_path: Path, urls: list[str], version: str) -> FleetRollout:
    hotswap = HotSwapCallback(tmp_path / "store", "policy", on_improvement=False, every_n_steps=1)
    hotswap.publications.append(Publication(step=1, value=None, reasons=("schedule",), version=version))
    return FleetRollout(urls, hotswap, max_staleness=0, timeout=30)


def test_the_rollout_waits_on_one_answer_per_engine(tmp_path: Path, fake_engines) -> None:
    engines = [fake_engines(), fake_engines()]
    version = "2025-01-01T00-00-00Z"
    rollout = rollout_for(tmp_path, [e.url for e in engines], version)
    assert rollout.publisher.notifier.urls == [e.url for e in engines]  # its engines get the publisher's notices
    for engine in engines:
        threading.Timer(0.5, engine.serve, args=(version,)).start()
    assert rollout._wait_for_version() == (version, version, 0)
    for engine in engines:
        assert engine.requests == ["/v1/lora/wait"]  # one long poll each, no polling loop


def test_the_rollout_polls_engines_without_the_wait_route(tmp_path: Path, fake_engines) -> None:
    engine = fake_engines(wait_route=False)  # an older plugin
    version = "2025-01-01T00-00-00Z"
    rollout = rollout_for(tmp_path, [engine.url], version)
    threading.Timer(0.3, engine.serve, args=(version,)).start()
    assert rollout._wait_for_version() == (version, version, 0)
    assert engine.requests[0] == "/v1/lora/wait" and set(engine.requests[1:]) == {"/v1/lora/adapters"}


def test_the_rollout_waits_for_the_commit_then_the_engines(tmp_path: Path, fake_engines) -> None:
    engine = fake_engines()
    hotswap = HotSwapCallback(tmp_path / "store", "policy", on_improvement=False, every_n_steps=1)
    publication = Publication(step=1, value=None, reasons=("schedule",))
    hotswap.publications.append(publication)
    rollout = FleetRollout([engine.url], hotswap, max_staleness=0, timeout=30)
    version = "2025-01-01T00-00-00Z"

    def commit() -> None:
        publication.version = version
        engine.serve(version)
        with hotswap._committed:
            hotswap._committed.notify_all()

    threading.Timer(0.3, commit).start()
    assert rollout._wait_for_version() == (version, version, 0)
    assert engine.requests == ["/v1/lora/wait"]  # nothing asked of the engine before there was a version


def test_a_batch_runs_beside_the_probe_and_is_sampled_again_when_the_version_fails_it(
    tmp_path: Path, fake_engines, toy_model: Path
) -> None:
    """The engine says v2 is open to pinned samples while probed: the batch goes at once. Its
    probe fails (409): that batch is discarded, never returned; the rollout waits again and,
    once the trainer's next version is served, returns samples of that version only."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    engine = fake_engines()
    v1, v2, v3 = "2025-01-01T00-00-00Z", "2025-01-01T00-00-01Z", "2025-01-01T00-00-02Z"
    rollout = rollout_for(tmp_path, [engine.url], v1)
    rollout.publisher.publications.append(Publication(step=2, value=None, reasons=("schedule",), version=v2))
    engine.served, engine.probing = v1, v2

    def next_version() -> None:  # the trainer's fix, served a moment after the refusal
        wait_until(lambda: rollout.refused == [v2], "the refusal")
        rollout.publisher.publications.append(Publication(step=3, value=None, reasons=("schedule",), version=v3))
        engine.serve(v3)

    threading.Thread(target=next_version, daemon=True).start()
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(num_processes=1),
        processing_class=AutoTokenizer.from_pretrained(toy_model),
        state=SimpleNamespace(global_step=3),
        max_completion_length=4,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        repetition_penalty=1.0,
        num_generations=1,
    )
    out = rollout(["hello world"], trainer)
    assert out["policy_version"] == [v3] and rollout.refused == [v2]
    assert engine.sampled == [f"policy@{v2}", f"policy@{v3}"]


def test_the_scheduler_notifies_its_instances_after_each_store_change(
    tmp_path: Path, lora: Path, fake_engines
) -> None:
    import asyncio

    from vllm_lora_hotswap.fleet.scheduler import DistributedLoRAScheduler

    engine = fake_engines()
    port = int(engine.url.rsplit(":", 1)[1])
    scheduler = DistributedLoRAScheduler(
        base_port=port, num_gpus=1, cpfs_base=str(tmp_path / "store"), api_key="secret"
    )

    async def scenario() -> tuple[str, str]:
        first = await scheduler.publish_lora_update("policy", lora)
        second = await scheduler.publish_lora_update("policy", lora)
        assert await scheduler.rollback_lora("policy", first)
        await scheduler.stop()  # waits for the notices in flight
        return first, second

    first, second = asyncio.run(scenario())
    # Sent concurrently (never awaited by the publisher): in any order.
    assert sorted(body["version"] for body, _ in engine.notices) == sorted([first, second, first])
    assert all(body["adapter"] == "policy" and key == "Bearer secret" for body, key in engine.notices)


def test_an_adapter_sampled_lately_expects_a_batch_for_its_next_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rollout loop's next wait often arrives after the notice has started the probe: an
    adapter that a caller waited to sample lately still tells the gate to expect its batch."""
    import asyncio

    from vllm_lora_hotswap.events import EventBus

    engine = SimpleNamespace(gate_listeners=[])
    controller = SimpleNamespace(bus=EventBus(), engine=engine, current=lambda adapter: None)
    loop = asyncio.new_event_loop()
    try:
        waits = notices.ServedWaits(controller, loop)  # type: ignore[arg-type]
        (expects_batch,) = engine.gate_listeners
        assert not expects_batch("policy")
        assert not loop.run_until_complete(waits.wait("policy", "2025-08-18T10-00-00Z", 0, sampling=True))
        assert expects_batch("policy") and not expects_batch("other")
        monkeypatch.setattr(notices, "SAMPLED_RECENTLY_S", 0.0)
        assert not expects_batch("policy")
    finally:
        loop.close()
