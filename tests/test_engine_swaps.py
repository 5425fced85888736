"""A real vLLM CPU engine follows the store: every served version is checked against HF + PEFT."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hotswap_devkit.server import VllmServer
from tests.conftest import PROMPTS
from vllm_lora_hotswap.store import CheckpointStore

pytestmark = pytest.mark.engine


def assert_serves(engine: VllmServer, model: str, adapter_dir: Path, reference: Callable, version: str) -> None:
    for prompt in PROMPTS:
        served_by, tokens = engine.tokens(model, prompt)
        assert served_by == f"{model.split('@')[0]}@{version}"
        assert tokens == reference(adapter_dir, prompt), f"{model} on {prompt!r} is not {version}'s PEFT output"


def test_a_published_version_is_served_exactly(
    engine: VllmServer, shared_store: CheckpointStore, make_lora, reference
) -> None:
    """Foundation: greedy output of a published store version equals HF + PEFT."""
    store = shared_store
    lora = make_lora(1)
    version = store.publish("basic", lora, {"reward": 0.5})
    engine.wait_served("basic", version)
    assert_serves(engine, "basic", lora, reference, version)
    assert engine.tokens(str(engine.model), PROMPTS[0])[1] == reference(None, PROMPTS[0])


def test_versions_of_falling_and_rising_rank_are_each_served_exactly(
    engine: VllmServer, shared_store: CheckpointStore, make_lora, reference
) -> None:
    """Slots are reused and a write clears only the rank rows the slot's last adapter wrote:
    a rank-4 version after a rank-16 one must not keep any of the rank-16 rows."""
    for seed, rank in ((21, 16), (22, 4), (23, 12), (24, 2)):
        lora = make_lora(seed, rank)
        version = shared_store.publish("ranks", lora)
        engine.wait_served("ranks", version)
        assert_serves(engine, "ranks", lora, reference, version)


def test_swaps_show_in_metrics_and_one_log_line_each(
    engine: VllmServer, shared_store: CheckpointStore, make_lora
) -> None:
    version = shared_store.publish("observed", make_lora(3))
    engine.wait_served("observed", version)
    metrics = engine.client.get("/metrics").text
    assert 'vllm_hotswap_swaps_total{adapter="observed",result="served"} 1.0' in metrics
    assert f'vllm_hotswap_served_version{{adapter="observed",version="{version}"}} 1.0' in metrics
    for phase in ("validate", "stage", "install", "probe", "switch"):
        assert f'vllm_hotswap_phase_seconds_count{{adapter="observed",phase="{phase}"}} 1.0' in metrics
    staged = [x for x in metrics.splitlines() if x.startswith("vllm_hotswap_staged_bytes ")]
    assert staged and float(staged[0].split()[-1]) > 0
    (line,) = [x for x in engine.log_path.read_text().splitlines() if "hotswap swap adapter=observed" in x]
    assert f"version={version} result=served mode=versioned" in line and "stage_ms=" in line and "probe_ms=" in line


def test_swap_rollback_follow_and_pinned_versions(
    engine: VllmServer, shared_store: CheckpointStore, make_lora, reference
) -> None:
    store = shared_store
    lora_v1, lora_v2 = make_lora(11), make_lora(12)
    v1 = store.publish("lora1", lora_v1, {"reward": 0.1})
    engine.wait_served("lora1", v1)
    assert_serves(engine, "lora1", lora_v1, reference, v1)

    v2 = store.publish("lora1", lora_v2, {"reward": 0.2})
    engine.wait_served("lora1", v2, timeout=0.5 + 30)  # poll interval + swap time (generous on 2 cores)
    assert_serves(engine, "lora1", lora_v2, reference, v2)

    store.pin("lora1", v1)  # rollback
    engine.wait_served("lora1", v1)
    assert_serves(engine, "lora1", lora_v1, reference, v1)

    store.follow("lora1")
    engine.wait_served("lora1", v2)
    assert_serves(engine, "lora1", lora_v2, reference, v2)

    # A retained version answers by name while the adapter serves another.
    assert_serves(engine, f"lora1@{v1}", lora_v1, reference, v1)
    models = {m["id"]: m for m in engine.client.get("/v1/models").json()["data"]}
    assert models["lora1"]["root"] == str(store.version_dir("lora1", v2))
    assert not any("@" in name for name in models)


def test_unknown_pinned_version_is_a_clear_404(engine: VllmServer, shared_store: CheckpointStore, make_lora) -> None:
    store = shared_store
    version = store.publish("lora404", make_lora(1))
    engine.wait_served("lora404", version)
    response = engine.client.post(
        "/v1/completions", json={"model": "lora404@2020-01-01T00-00-00Z", "prompt": "hi", "max_tokens": 2}
    )
    assert response.status_code == 404
    assert "no such READY version" in response.json()["error"]["message"]
    assert engine.adapters()["lora404"]["last_error"] is None


def test_new_adapter_is_listed_and_servable_within_the_poll_interval(
    engine: VllmServer, shared_store: CheckpointStore, make_lora
) -> None:
    store = shared_store
    version = store.publish("fresh", make_lora(2))
    engine.wait_until(
        lambda: "fresh" in {m["id"] for m in engine.client.get("/v1/models").json()["data"]}, 30, "fresh in /v1/models"
    )
    assert engine.tokens("fresh", PROMPTS[0])[0] == f"fresh@{version}"


def test_prefix_cache_never_serves_the_old_version(
    engine: VllmServer, shared_store: CheckpointStore, make_lora, reference
) -> None:
    """A prompt longer than a KV block (128 tokens on CPU) is cached under v1; after the
    swap the same prompt must get v2's output, never v1's cached blocks."""
    store = shared_store
    lora_v1, lora_v2 = make_lora(21), make_lora(22)
    long_prompt = " ".join(["the store is the one source of truth that engines follow"] * 9)  # ~160 tokens
    v1 = store.publish("cached", lora_v1)
    engine.wait_served("cached", v1)
    for _ in range(2):  # the second request hits the prefix cache
        assert engine.tokens("cached", long_prompt)[1] == reference(lora_v1, long_prompt)
    v2 = store.publish("cached", lora_v2)
    engine.wait_served("cached", v2)
    for _ in range(2):
        assert engine.tokens("cached", long_prompt) == (f"cached@{v2}", reference(lora_v2, long_prompt))
    metrics = engine.client.get("/metrics").text
    hits = [line for line in metrics.splitlines() if line.startswith("vllm:prefix_cache_hits_total")]
    assert hits and float(hits[0].split()[-1]) > 0, "the prefix cache was never used"


def test_streaming_clients_during_30_swaps_each_get_exactly_one_version(
    engine: VllmServer, shared_store: CheckpointStore, make_lora, reference
) -> None:
    store = shared_store
    loras = [make_lora(31), make_lora(32)]
    prompt = PROMPTS[1]
    expected = [reference(lora, prompt, 16) for lora in loras]
    weights_of: dict[str, int] = {}
    first = store.publish("stream", loras[0])
    weights_of[first] = 0
    engine.wait_served("stream", first)

    done = threading.Event()
    results: list[tuple[set[str], list[int]]] = []
    errors: list[BaseException] = []

    def client() -> None:
        while not done.is_set():
            try:
                results.append(engine.stream("stream", prompt, 16))
            except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

    installs_before = _installs(engine)
    threads = [threading.Thread(target=client) for _ in range(16)]
    for thread in threads:
        thread.start()
    try:
        for swap in range(30):
            which = (swap + 1) % 2
            version = store.publish("stream", loras[which])
            weights_of[version] = which
            engine.wait_served("stream", version, timeout=60)
    finally:
        done.set()
        for thread in threads:
            thread.join(120)
    assert not errors, errors[:3]
    assert len(results) >= 30
    # Installs were written into a LoRA slot while staging. One copies in the step only when both
    # slots (--max-loras 2) hold versions that running requests use; then none can be reserved.
    installs = {key: count - installs_before[key] for key, count in _installs(engine).items()}
    assert installs["slot_writes"] > 0 and sum(installs.values()) >= 30, installs
    versions_seen = set()
    for served_by, tokens in results:
        assert len(served_by) == 1, f"one response streamed from several versions: {served_by}"
        version = next(iter(served_by)).split("@", 1)[1]
        versions_seen.add(version)
        assert tokens == expected[weights_of[version]], f"response from {version} mixes versions"
    assert len(versions_seen) >= 5
    # vLLM's per-LoRA request gauge names adapters, not versions: its series do not grow with swaps.
    info = [
        line for line in engine.client.get("/metrics").text.splitlines() if line.startswith("vllm:lora_requests_info{")
    ]
    assert info and 'running_lora_adapters="stream"' in "".join(info)
    assert not [line for line in info if "stream@" in line], info


def _installs(engine: VllmServer) -> dict[str, int]:
    workers = engine.client.get("/v1/lora/workers").json()["workers"]
    return {key: sum(worker[key] for worker in workers) for key in ("slot_writes", "step_copies")}


def _commit_with_fifo_config(store: CheckpointStore, adapter: str, src: Path) -> tuple[str, Path]:
    """A seed-style version (empty READY) whose adapter_config.json is a FIFO: every read
    of it blocks until the test writes the config, so the test controls how slow the store is."""
    from datetime import UTC, datetime

    from vllm_lora_hotswap.store import next_version

    version = next_version(datetime.now(UTC), store.versions(adapter)[-1])
    staging = store.adapter_dir(adapter) / ".staging" / f"fifo-{version}"
    staging.mkdir(parents=True)
    (staging / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    os.mkfifo(staging / "adapter_config.json")
    (staging / "READY").write_bytes(b"")
    os.rename(staging, store.adapter_dir(adapter) / version)
    (store.adapter_dir(adapter) / "LATEST").write_text(version)
    return version, store.version_dir(adapter, version) / "adapter_config.json"


def _feed(fifo: Path, data: bytes) -> None:
    with open(fifo, "wb") as writer:  # blocks until a reader opens the FIFO
        writer.write(data)


@pytest.mark.parametrize("deleted", [False, True], ids=["slow", "deleted-while-staging"])
def test_slow_store_reads_never_block_the_engine_loop(
    engine: VllmServer, shared_store: CheckpointStore, make_lora, reference, deleted: bool
) -> None:
    store = shared_store
    adapter = "slow-deleted" if deleted else "slow"
    lora_v1, lora_v2 = make_lora(81), make_lora(82)
    v1 = store.publish(adapter, lora_v1)
    engine.wait_served(adapter, v1)
    v2, fifo = _commit_with_fifo_config(store, adapter, lora_v2)
    config = (lora_v2 / "adapter_config.json").read_bytes()

    _feed(fifo, config)  # the API server's validation reads it once...
    engine.wait_until(lambda: engine.adapters()[adapter]["state"] == "swapping", 10, "staging to start")
    # ...and the worker's staging thread is now blocked reading it. The engine keeps serving.
    # Every one of them answers although the staging read never finishes by itself.
    expected = (f"{adapter}@{v1}", reference(lora_v1, PROMPTS[0]))
    for _ in range(5):
        assert engine.tokens(adapter, PROMPTS[0]) == expected
    assert engine.adapters()[adapter]["state"] == "swapping"

    if deleted:
        moved = store.adapter_dir(adapter) / ".staging" / "deleted"
        os.rename(store.version_dir(adapter, v2), moved)
        _feed(moved / "adapter_config.json", config)
        engine.wait_until(lambda: engine.adapters()[adapter]["last_swap"]["result"] == "failed", 30, "the failure")
        assert engine.tokens(adapter, PROMPTS[0]) == (f"{adapter}@{v1}", reference(lora_v1, PROMPTS[0]))
    else:
        _feed(fifo, config)
        engine.wait_served(adapter, v2)
        assert engine.tokens(adapter, PROMPTS[0]) == (f"{adapter}@{v2}", reference(lora_v2, PROMPTS[0]))


def test_a_held_stage_holds_up_no_other_adapter_status_or_pinned_version(
    engine: VllmServer, shared_store: CheckpointStore, make_lora, reference
) -> None:
    """While one adapter's staging blocks on a read that never finishes, the instance's status,
    a request pinning an installed version and a swap and a completion on another adapter all
    go through (before, one swap held the pipeline's lock through staging)."""
    store = shared_store
    lora_v1, lora_v2, other_v1, other_v2 = make_lora(83), make_lora(84), make_lora(85), make_lora(86)
    v1, o1 = store.publish("held", lora_v1), store.publish("held-other", other_v1)
    engine.wait_served("held", v1)
    engine.wait_served("held-other", o1)
    v2, fifo = _commit_with_fifo_config(store, "held", lora_v2)
    config = (lora_v2 / "adapter_config.json").read_bytes()
    _feed(fifo, config)  # validation reads it; the worker's staging now blocks on it
    engine.wait_until(lambda: engine.adapters()["held"]["phase"] == "stage", 10, "staging to start")

    latencies: dict[str, float] = {}

    def timed(name: str, call: Callable[[], object]) -> object:
        start = time.monotonic()
        result = call()
        latencies[name] = time.monotonic() - start
        return result

    assert timed("status", engine.adapters)["held"]["state"] == "swapping"
    assert timed("pinned", lambda: engine.tokens(f"held@{v1}", PROMPTS[0])) == (
        f"held@{v1}",
        reference(lora_v1, PROMPTS[0]),
    )
    o2 = store.publish("held-other", other_v2)
    engine.wait_served("held-other", o2, timeout=30)
    assert timed("other", lambda: engine.tokens("held-other", PROMPTS[0])) == (
        f"held-other@{o2}",
        reference(other_v2, PROMPTS[0]),
    )
    assert engine.adapters()["held"]["phase"] == "stage", "the other adapter went ahead while this one still stages"
    print(f"answered while a stage was held: {', '.join(f'{k} {1000 * v:.0f} ms' for k, v in latencies.items())}")

    _feed(fifo, config)
    engine.wait_served("held", v2)
    assert engine.tokens("held", PROMPTS[0]) == (f"held@{v2}", reference(lora_v2, PROMPTS[0]))


def _phase_count(engine: VllmServer, adapter: str, phase: str) -> float:
    prefix = f'vllm_hotswap_phase_seconds_count{{adapter="{adapter}",phase="{phase}"}} '
    lines = [line for line in engine.client.get("/metrics").text.splitlines() if line.startswith(prefix)]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_a_pinned_version_in_use_is_staged_and_probed_once(
    engine: VllmServer, shared_store: CheckpointStore, make_lora, reference
) -> None:
    """Requests naming ``adapter@<old version>`` keep that version installed: its idle clock
    restarts with each request, so it is not retired and staged again in between."""
    store = shared_store
    lora_v1, lora_v2 = make_lora(87), make_lora(88)
    v1 = store.publish("pinned-use", lora_v1)
    engine.wait_served("pinned-use", v1)
    v2 = store.publish("pinned-use", lora_v2)
    engine.wait_served("pinned-use", v2)
    engine.wait_until(lambda: engine.adapters()["pinned-use"]["installed_versions"] == [v2], 30, "v1 to retire")
    before = {phase: _phase_count(engine, "pinned-use", phase) for phase in ("stage", "probe")}
    grace = 1.0  # VLLM_HOTSWAP_RETIRE_GRACE of the shared engine
    results: list[tuple[str, list[int]]] = []
    clients = []
    for _ in range(6):  # one request every grace / 2, for three times the grace, however long each takes
        client = threading.Thread(target=lambda: results.append(engine.tokens(f"pinned-use@{v1}", PROMPTS[0])))
        client.start()
        clients.append(client)
        time.sleep(grace / 2)
    for client in clients:
        client.join()
    assert results == [(f"pinned-use@{v1}", reference(lora_v1, PROMPTS[0]))] * 6
    after = {phase: _phase_count(engine, "pinned-use", phase) for phase in ("stage", "probe")}
    assert {phase: after[phase] - before[phase] for phase in after} == {"stage": 1.0, "probe": 1.0}
    engine.wait_until(
        lambda: engine.adapters()["pinned-use"]["installed_versions"] == [v2], 30, "v1 to retire once unused"
    )
