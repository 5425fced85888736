"""Benchmark 4: host memory over many swaps.

Publishes version after version of one adapter, as fast as the instance
serves them, and samples the resident set size of every process of the
server (API server, engine core, worker) every ``every`` swaps. Old versions
are garbage-collected from the store as a trainer's retention would, so
the disk does not fill up over a thousand swaps.
"""

from __future__ import annotations

import time
from typing import Any

import psutil

from vllm_lora_hotswap.store import CheckpointStore

from .assets import Assets
from .common import Progress, Server

ADAPTER_SHAPE = "r16-all"
REFERENCE_SWAPS = 50  # the target compares the last sample with the one after this many swaps
LIMIT = 0.02


def process_rss(server: Server) -> dict[str, int]:
    """RSS in bytes of each process of the server, by role."""
    assert server.process is not None
    rss: dict[str, int] = {}
    for process in server.processes():
        try:
            name = process.name()
            value = process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
        if process.pid == server.process.pid:
            role = "api_server"
        elif "EngineCore" in name:
            role = "engine_core"
        elif "Worker" in name:
            role = "worker"
        else:
            role = f"other:{name}"
        rss[role] = rss.get(role, 0) + value
    return rss


def run(server: Server, store: CheckpointStore, assets: Assets, swaps: int, every: int = 10) -> dict[str, Any]:
    adapter = f"memory-{ADAPTER_SHAPE}"
    sources = assets.adapters[ADAPTER_SHAPE]
    server.wait_swapped(adapter, store.publish(adapter, sources[0]))
    started = time.monotonic()
    samples = [{"swaps": 0, "seconds": 0.0, "rss": process_rss(server)}]
    progress = Progress("swaps", swaps)
    for index in range(1, swaps + 1):
        version = store.publish(adapter, sources[index % len(sources)])
        # Not waiting for the old version's retirement: it happens in the background,
        # as it does when a trainer publishes faster than requests drain.
        server.wait_swapped(adapter, version, retired=False)
        if index % every == 0:
            store.gc(keep=2, adapters=[adapter])
            samples.append({"swaps": index, "seconds": time.monotonic() - started, "rss": process_rss(server)})
        progress.advance()
    store.retire(adapter)
    return {"adapter_shape": ADAPTER_SHAPE, "sample_every": every, "samples": samples}


def target(result: dict[str, Any]) -> dict[str, Any]:
    """Total RSS after the last swap within 2% of the total after the first 50 swaps."""
    samples = result["samples"]
    reference = max((s for s in samples if s["swaps"] <= REFERENCE_SWAPS), key=lambda s: s["swaps"])
    last = samples[-1]
    growth = sum(last["rss"].values()) / sum(reference["rss"].values()) - 1
    return {
        "reference_swaps": reference["swaps"],
        "last_swaps": last["swaps"],
        "measured": growth,
        "limit": LIMIT,
        "ratio": abs(growth) / LIMIT,
        "met": abs(growth) <= LIMIT,
    }
