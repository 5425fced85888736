"""Benchmark 6: eight adapters published at the same moment against one.

One round publishes one adapter alone and waits until it is served, then
publishes eight adapters at once (from eight threads) and waits until all are
served. Each time runs from the first commit (READY's mtime) to the last
switch (the instance's own ``last_swap.finished_at``). Target: the eight are
all served within 2 × what one takes (p50 over the rounds), which holds only
when their swaps progress together instead of one after another.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vllm_lora_hotswap.store import CheckpointStore

from .assets import Assets
from .common import Progress, Server, summary
from .publish_latency import ready_mtime

ADAPTERS = 8
ADAPTER_SHAPE = "r16-qv"
FACTOR = 2.0


def _publish_and_wait(server: Server, store: CheckpointStore, adapters: list[str], source: Any) -> float:
    with ThreadPoolExecutor(len(adapters)) as pool:
        versions = list(pool.map(lambda adapter: store.publish(adapter, source), adapters))
    committed = min(ready_mtime(store, a, v) for a, v in zip(adapters, versions))
    switched = [server.wait_swapped(a, v, retired=False)["last_swap"]["finished_at"] for a, v in zip(adapters, versions)]
    return max(switched) - committed


def run(server: Server, store: CheckpointStore, assets: Assets, rounds: int) -> dict[str, Any]:
    sources = assets.adapters[ADAPTER_SHAPE]
    names = [f"parallel-{i}" for i in range(ADAPTERS)]
    _publish_and_wait(server, store, names, sources[0])  # warm-up: every adapter holds a version
    one, eight = [], []
    progress = Progress("rounds", rounds)
    for index in range(rounds):
        source = sources[(index + 1) % len(sources)]
        one.append(_publish_and_wait(server, store, names[:1], source))
        eight.append(_publish_and_wait(server, store, names, source))
        progress.advance()
    for name in names:
        store.retire(name)
    return {"adapters": ADAPTERS, "adapter_shape": ADAPTER_SHAPE, "one": summary(one), "eight": summary(eight),
            "one_s": one, "eight_s": eight}  # fmt: skip


def target(result: dict[str, Any]) -> dict[str, Any]:
    """p50 of eight at once ≤ 2 × p50 of one."""
    limit = FACTOR * result["one"]["p50"]
    measured = result["eight"]["p50"]
    return {"measured_s": measured, "limit_s": limit, "ratio": measured / limit, "met": measured <= limit}
