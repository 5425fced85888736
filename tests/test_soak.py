"""Soak: 16 streaming clients for the whole run while swaps go round 4 adapters.

CI runs 100 swaps; ``make soak`` runs 1,000 (``HOTSWAP_SOAK_SWAPS``). Every
response must come from one version and equal PEFT's greedy output for that
version; no request may fail; the engine's memory, file descriptors and
threads must not grow with the number of swaps.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import PROMPTS
from tests.support.server import VllmServer
from vllm_lora_hotswap.store import CheckpointStore

pytestmark = [pytest.mark.engine, pytest.mark.soak]

SWAPS = int(os.environ.get("HOTSWAP_SOAK_SWAPS", "100"))
ADAPTERS = [f"soak{i}" for i in range(4)]
CLIENTS = 16
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def soak_engine(toy_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VllmServer, CheckpointStore]]:
    root = tmp_path_factory.mktemp("soak-store")
    log = tmp_path_factory.mktemp("logs") / "soak-engine.log"
    # 4 adapters, each with a version retiring while the next serves: 8 host slots and
    # some to spare; all 4 adapters in one batch.
    server = VllmServer(toy_model, root, log, args=["--max-cpu-loras", "12", "--max-loras", "4"])
    yield server.start(), CheckpointStore(root)
    server.stop()


def _engine_processes(server: VllmServer) -> list[psutil.Process]:
    assert server.process is not None
    root = psutil.Process(server.process.pid)
    return [root, *root.children(recursive=True)]


def _usage(server: VllmServer) -> dict[str, int]:
    processes = _engine_processes(server)
    return {
        "rss": sum(p.memory_info().rss for p in processes),
        "fds": sum(p.num_fds() for p in processes),
        "threads": sum(p.num_threads() for p in processes),
    }


def test_soak_swaps_under_streaming_load(soak_engine, make_lora, reference) -> None:
    engine, store = soak_engine
    sources = {adapter: [make_lora(150 + 2 * i), make_lora(151 + 2 * i)] for i, adapter in enumerate(ADAPTERS)}
    source_of: dict[tuple[str, str], Path] = {}
    for adapter in ADAPTERS:
        version = store.publish(adapter, sources[adapter][0])
        source_of[adapter, version] = sources[adapter][0]
        engine.wait_served(adapter, version)
    plans = [(ADAPTERS[k % len(ADAPTERS)], PROMPTS[k % len(PROMPTS)]) for k in range(CLIENTS)]
    expected = {(src, prompt): reference(src, prompt, MAX_TOKENS) for srcs in sources.values() for src in srcs
                for prompt in PROMPTS}  # fmt: skip
    for adapter, prompt in plans:  # warm every path once, then take the baseline
        engine.stream(adapter, prompt, MAX_TOKENS)
    time.sleep(2)
    before = _usage(engine)

    done = threading.Event()
    results: list[tuple[str, set[str], list[int]]] = []
    errors: list[str] = []

    def client(adapter: str, prompt: str) -> None:
        while not done.is_set():
            try:
                served_by, tokens = engine.stream(adapter, prompt, MAX_TOKENS)
                results.append((prompt, served_by, tokens))
            except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
                errors.append(f"{adapter}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=plan, daemon=True) for plan in plans]
    for thread in threads:
        thread.start()
    rss_samples: list[int] = []
    try:
        for swap in range(SWAPS):
            adapter = ADAPTERS[swap % len(ADAPTERS)]
            src = sources[adapter][(swap // len(ADAPTERS) + 1) % 2]
            version = store.publish(adapter, src)
            source_of[adapter, version] = src
            engine.wait_served(adapter, version, timeout=60)
            if swap % 10 == 9:
                rss_samples.append(_usage(engine)["rss"])
                store.gc(keep=3, adapters=[adapter])  # a trainer's retention keeps the store small
    finally:
        done.set()
        for thread in threads:
            thread.join(120)
    time.sleep(2)  # let the last versions retire and the connections close
    after = _usage(engine)

    assert not errors, f"{len(errors)} failed requests, e.g. {errors[:3]}"
    assert len(results) >= SWAPS
    for prompt, served_by, tokens in results:
        assert len(served_by) == 1, f"one response streamed from several versions: {served_by}"
        adapter, version = next(iter(served_by)).split("@", 1)
        assert tokens == expected[source_of[adapter, version], prompt], f"{adapter}@{version} served other weights"
    served_versions = {served for _, by, _ in results for served in by}
    assert len(served_versions) >= SWAPS // 2, "clients saw few of the versions"
    # Bounded: no growth with the number of swaps beyond allocator noise.
    warm_rss = rss_samples[0] if rss_samples else before["rss"]
    assert after["rss"] <= warm_rss * 1.05, f"RSS grew from {warm_rss >> 20} MiB to {after['rss'] >> 20} MiB"
    assert after["fds"] <= before["fds"] + 4, (before, after)
    assert after["threads"] <= before["threads"] + 8, (before, after)
