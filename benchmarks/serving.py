"""Benchmark 3: serving under swaps against serving without them.

16 clients stream completions from the adapter without pause. One load run
is cut into three phases: no swaps, a new version published every
``swap_every`` seconds, no swaps again (each quiet phase half as long as the
swap phase), so slow drift of a shared machine weighs on both sides alike.
Output tokens/s and inter-token latency are taken per phase.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from vllm_lora_hotswap.store import CheckpointStore

from .assets import Assets
from .common import Progress, Server, Stream, StreamLoad, summary

ADAPTER_SHAPE = "r16-qv"
CLIENTS = 16
# Short requests: in versioned mode a request finishes on the version it started
# on, so every version younger than the longest request holds a LoRA slot.
MAX_TOKENS = 32
# Clients start this far apart: in lockstep, all 16 prefill at once and the
# throughput of a window depends on where it cuts that cycle.
STAGGER_S = 0.4
BIN_S = 1.0

THROUGHPUT_MIN = 0.98
ITL_P99_MAX = 1.1


def run(server: Server, store: CheckpointStore, assets: Assets, seconds: float, swap_every: float = 2.0) -> dict[str, Any]:
    adapter = f"serve-{ADAPTER_SHAPE}"
    sources = assets.adapters[ADAPTER_SHAPE]
    server.wait_swapped(adapter, store.publish(adapter, sources[0]))
    publishes: list[tuple[float, str]] = []
    progress = Progress("swaps", int(seconds / swap_every))
    with StreamLoad(server.url, adapter, [MAX_TOKENS] * CLIENTS, STAGGER_S) as load:
        load.wait_warm()
        start = time.time()
        time.sleep(seconds / 2)
        swaps_start = time.time()
        for index in range(progress.total):
            due = swaps_start + index * swap_every
            time.sleep(max(0.0, due - time.time()))
            publishes.append((time.time(), store.publish(adapter, sources[(index + 1) % len(sources)])))
            progress.advance()
        time.sleep(max(0.0, swaps_start + seconds - time.time()))
        swaps_end = time.time()
        time.sleep(seconds / 2)
        end = time.time()
    store.retire(adapter)
    phases = {"no_swaps": [(start, swaps_start), (swaps_end, end)], "swaps": [(swaps_start, swaps_end)]}
    served = {s.model.partition("@")[2] for s in load.streams if s.model}
    result: dict[str, Any] = {
        "clients": CLIENTS,
        "max_tokens": MAX_TOKENS,
        "swap_every_s": swap_every,
        "phase_seconds": seconds,
        "published": len(publishes),
        "published_versions_served": sum(1 for _, version in publishes if version in served),
        "publish_times": [t - start for t, _ in publishes],
        "stream_errors": load.errors,
        "timeline": _timeline(load.streams, start, end),
    }
    for name, windows in phases.items():
        result[name] = _phase(load.streams, windows)
    return result


def _phase(streams: list[Stream], windows: list[tuple[float, float]]) -> dict[str, Any]:
    """Tokens/s and inter-token gaps of the chunks that arrived inside ``windows``."""

    def inside(t: float) -> bool:
        return any(a <= t < b for a, b in windows)

    tokens = sum(n for s in streams for t, n in zip(s.chunk_times, s.chunk_tokens) if inside(t))
    gaps = [b - a for s in streams for a, b in s.gaps() if inside(b)]
    duration = sum(b - a for a, b in windows)
    return {"seconds": duration, "tokens": tokens, "tokens_per_s": tokens / duration, "itl": summary(gaps)}


def _timeline(streams: list[Stream], start: float, end: float) -> dict[str, list[float]]:
    """Output tokens/s in ``BIN_S`` bins from the start of the measured load."""
    chunks = [(t - start, n) for s in streams for t, n in zip(s.chunk_times, s.chunk_tokens) if start <= t < end]
    edges = np.arange(0.0, end - start + BIN_S, BIN_S)
    counts, _ = np.histogram([t for t, _ in chunks], bins=edges, weights=[n for _, n in chunks])
    return {"bin_start_s": edges[:-1].tolist(), "tokens_per_s": (counts / BIN_S).tolist()}


def targets(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Throughput ≥ 98% of no-swap; p99 ITL ≤ 1.1× no-swap (issue 14: no regression)."""
    quiet, swapping = result["no_swaps"], result["swaps"]
    throughput = swapping["tokens_per_s"] / quiet["tokens_per_s"]
    itl = swapping["itl"]["p99"] / quiet["itl"]["p99"]
    return {
        "throughput": {"measured": throughput, "limit": THROUGHPUT_MIN, "ratio": throughput / THROUGHPUT_MIN,
                       "met": throughput >= THROUGHPUT_MIN},
        "p99_itl": {"measured": itl, "limit": ITL_P99_MAX, "ratio": itl / ITL_P99_MAX, "met": itl <= ITL_P99_MAX},
    }  # fmt: skip
