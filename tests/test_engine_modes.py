"""Engines in other configurations: offline LLM, in-place mode, tight slots, slow stores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotswap_devkit.server import VllmServer
from tests.conftest import PROMPTS
from vllm_lora_hotswap.store import CheckpointStore

pytestmark = pytest.mark.engine
SCRIPTS = Path(__file__).parent / "scripts"


def test_offline_llm_follows_the_store(toy_model: Path, make_lora, reference, tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "store")
    lora_v1, lora_v2 = make_lora(51), make_lora(52)
    v1 = store.publish("lora1", lora_v1)
    out = tmp_path / "out.json"
    env = {**os.environ, "VLLM_HOTSWAP_ROOT": str(store.root), "VLLM_CPU_KVCACHE_SPACE": "1"}
    run = subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "offline_colocated.py"),
            str(toy_model),
            str(store.root),
            str(lora_v2),
            str(out),
            PROMPTS[0],
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    v2 = results["v2_name"]
    assert results["first_sync"] == ["served"] and results["second_sync"] == ["served"]
    assert results["v1"] == [f"lora1@{v1}", reference(lora_v1, PROMPTS[0])]
    assert results["v2"] == [f"lora1@{v2}", reference(lora_v2, PROMPTS[0])]
    assert results["pinned_v1"] == [f"lora1@{v1}", reference(lora_v1, PROMPTS[0])]


@pytest.fixture(scope="module")
def tight_engine(toy_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """Two LoRA slots in all (--max-cpu-loras 2): versioned swaps have no spare slot."""
    root = tmp_path_factory.mktemp("tight-store")
    server = VllmServer(
        toy_model, root, tmp_path_factory.mktemp("logs") / "tight.log", args=["--max-cpu-loras", "2"]
    ).start()
    yield server
    server.stop()


def test_no_spare_slot_falls_back_to_in_place_and_no_slot_is_reported(
    tight_engine: VllmServer, make_lora, reference
) -> None:
    store = CheckpointStore(tight_engine.root)
    a1, a2, b1, c1 = make_lora(61), make_lora(62), make_lora(63), make_lora(64)
    va1 = store.publish("a", a1)
    vb1 = store.publish("b", b1)
    tight_engine.wait_served("a", va1)
    tight_engine.wait_served("b", vb1)

    va2 = store.publish("a", a2)  # both slots taken: swapped in place
    tight_engine.wait_served("a", va2)
    assert tight_engine.adapters()["a"]["last_swap"]["mode"] == "inplace"
    for prompt in PROMPTS:
        assert tight_engine.tokens("a", prompt) == (f"a@{va2}", reference(a2, prompt))
        assert tight_engine.tokens("b", prompt) == (f"b@{vb1}", reference(b1, prompt))

    vc1 = store.publish("c", c1)  # a third adapter does not fit: the reason is in the status
    tight_engine.wait_until(lambda: tight_engine.adapters().get("c", {}).get("state") == "no-slot", 30, "c no-slot")
    assert "--max-cpu-loras" in tight_engine.adapters()["c"]["last_error"]
    assert "waits: all 2 LoRA slots" in tight_engine.log_path.read_text()

    store.retire("b")  # frees a slot: c is served within the poll interval
    tight_engine.wait_served("c", vc1)
    assert tight_engine.tokens("c", PROMPTS[0]) == (f"c@{vc1}", reference(c1, PROMPTS[0]))
    assert (
        tight_engine.client.post("/v1/completions", json={"model": "b", "prompt": "hi", "max_tokens": 2}).status_code
        == 404
    )


@pytest.fixture(scope="module")
def inplace_engine(toy_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    root = tmp_path_factory.mktemp("inplace-store")
    server = VllmServer(
        toy_model,
        root,
        tmp_path_factory.mktemp("logs") / "inplace.log",
        # Also the engine whose processes sleep soon after a step (its tests then run in vLLM's idle mode).
        env={"VLLM_HOTSWAP_MODE": "inplace", "VLLM_HOTSWAP_IDLE_SPIN": "0.01"},
        args=["--enable-prefix-caching"],
    ).start()
    yield server
    server.stop()


def test_inplace_mode_swaps_in_the_same_slot_and_invalidates_its_prefix_cache(
    inplace_engine: VllmServer, make_lora, reference
) -> None:
    store = CheckpointStore(inplace_engine.root)
    lora_v1, lora_v2 = make_lora(71), make_lora(72)
    long_prompt = " ".join(["hot swapping adapters keeps every engine in step with the trainer"] * 8)
    v1 = store.publish("live", lora_v1)
    inplace_engine.wait_served("live", v1)
    assert inplace_engine.tokens("live", long_prompt) == ("live", reference(lora_v1, long_prompt))
    v2 = store.publish("live", lora_v2)
    inplace_engine.wait_served("live", v2)
    record = inplace_engine.adapters()["live"]
    assert record["installed_versions"] == [v2] and record["last_swap"]["mode"] == "inplace"
    for prompt in (long_prompt, *PROMPTS):
        assert inplace_engine.tokens("live", prompt) == ("live", reference(lora_v2, prompt))


def _cpu_seconds_after_a_request(server: VllmServer, window_s: float = 0.5) -> float:
    """CPU time vLLM's engine core and worker use in the ``window_s`` after one request ends."""
    processes = [p for p in server.processes()[1:] if p.name().startswith("VLLM")]  # not the API server
    assert processes, "no VLLM:: processes under the server"
    server.complete(str(server.model), "hello", max_tokens=2)

    def used() -> float:
        return sum(sum(p.cpu_times()[:2]) for p in processes)

    before = used()
    time.sleep(window_s)
    return used() - before


def test_idle_spin_lets_an_engine_sleep_between_steps(engine: VllmServer, inplace_engine: VllmServer) -> None:
    """vLLM's worker busy-polls for a second after each step (the shared engine, vLLM's default);
    with ``VLLM_HOTSWAP_IDLE_SPIN=0.01`` it sleeps 10 ms after one, and the cores are free."""
    default = _cpu_seconds_after_a_request(engine)
    short = _cpu_seconds_after_a_request(inplace_engine)
    assert default > 0.2, f"vLLM's own spin was expected to use most of a core: {default:.3f} s in 0.5 s"
    assert short < 0.1, f"with VLLM_HOTSWAP_IDLE_SPIN=0.01 the engine used {short:.3f} s of CPU in 0.5 s idle"
    assert inplace_engine.complete(str(inplace_engine.model), "hello", max_tokens=2)["choices"][0]["token_ids"]


@pytest.fixture(scope="module")
def shared_cache_engine(toy_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """Three entries in vLLM's adapter cache (--max-cpu-loras 3), shared with the adapters vLLM
    loads itself through its runtime LoRA routes."""
    root = tmp_path_factory.mktemp("shared-cache-store")
    server = VllmServer(
        toy_model,
        root,
        tmp_path_factory.mktemp("logs") / "shared-cache.log",
        args=["--max-cpu-loras", "3"],
        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"},
    ).start()
    yield server
    server.stop()


def test_versions_share_vllms_adapter_cache_with_the_adapters_vllm_loads_itself(
    shared_cache_engine: VllmServer, make_lora, reference
) -> None:
    """vLLM's ``/v1/unload_lora_adapter`` only forgets the name: the adapter stays in vLLM's cache
    (TRL's AsyncGRPO path leaves one per step). A version published into a cache full of them is
    installed at once, evicting the least recently used one as vLLM's own loads do. Our pinned
    versions leave one entry to vLLM: its next load of an adapter of its own evicts that one. A
    cache of pinned adapters only would stop vLLM's engine at its next load ("All items are
    pinned"), from a request inside a step."""
    engine = shared_cache_engine
    store = CheckpointStore(engine.root)

    def vllm_serves(index: int, *, load: bool = True, unload: bool = True) -> None:
        name, lora = f"vllm-own-{index}", make_lora(100 + index)
        if load:
            body = {"lora_name": name, "lora_path": str(lora)}
            engine.client.post("/v1/load_lora_adapter", json=body).raise_for_status()
        assert engine.tokens(name, PROMPTS[0]) == (name, reference(lora, PROMPTS[0]))  # now in vLLM's cache
        if unload:
            engine.client.post("/v1/unload_lora_adapter", json={"lora_name": name}).raise_for_status()

    for index in range(3):
        vllm_serves(index, unload=index != 2)  # vllm-own-2 stays loaded, as --lora-modules would
    assert len(engine.client.get("/v1/lora/workers").json()["workers"][0]["registered"]) == 3

    loras = {name: make_lora(seed) for name, seed in (("a", 121), ("b", 122), ("c", 123))}
    versions = {name: store.publish(name, loras[name]) for name in ("a", "b")}
    for name in ("a", "b"):
        engine.wait_served(name, versions[name], timeout=30)
        assert engine.adapters()[name]["last_error"] is None  # it never waited for a slot

    versions["c"] = store.publish("c", loras["c"])  # would pin the last entry: it waits, and says why
    engine.wait_until(lambda: engine.adapters().get("c", {}).get("state") == "no-slot", 30, "c no-slot")
    assert "less 1 kept for the adapters vLLM loads itself" in engine.adapters()["c"]["last_error"]

    vllm_serves(2, load=False, unload=False)  # still cached
    vllm_serves(3)  # evicts vllm-own-2, the one adapter of vLLM's cached
    vllm_serves(2, load=False)  # loaded again by vLLM in the step, evicting vllm-own-3
    for name in ("a", "b"):
        assert engine.tokens(name, PROMPTS[1]) == (f"{name}@{versions[name]}", reference(loras[name], PROMPTS[1]))

    store.retire("a")  # frees an entry: c is served
    engine.wait_served("c", versions["c"], timeout=30)
    assert engine.tokens("c", PROMPTS[0]) == (f"c@{versions['c']}", reference(loras["c"], PROMPTS[0]))
    worker = engine.client.get("/v1/lora/workers").json()["workers"][0]
    assert worker["disk_loads"] == 0  # vLLM's loads of its own adapters are not reads of the store
    assert "from the store inside a step" not in engine.log_path.read_text()
