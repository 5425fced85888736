"""Benchmark 3: serving under swaps against serving without them.

16 clients stream completions from the adapter without pause. The load run
alternates blocks without swaps and blocks with a new version published every
``swap_every`` seconds, quiet first and last: quiet, swaps, quiet, …, quiet.
This machine's speed wanders by several per cent from one half-minute to the
next (a single-threaded matmul loop on the idle machine: 7% coefficient of
variation in 0.5 s samples), so one long phase against another measures the
wander. Each swap block against the mean of the quiet blocks on either side
cancels it to first order, and the spread of those pairs gives the figure a
confidence interval. The first ``swap_every`` seconds of each block are left
out of the figures: requests begun in the block before finish there.
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
BLOCK_S = 10.0
BIN_S = 1.0
BOOTSTRAP_SAMPLES = 2000

THROUGHPUT_MIN = 0.98
ITL_P99_MAX = 1.1


def run(server: Server, store: CheckpointStore, assets: Assets, seconds: float, swap_every: float = 2.0) -> dict[str, Any]:
    """``seconds`` with swaps in all, in blocks of ``BLOCK_S``; one quiet block more."""
    adapter = f"serve-{ADAPTER_SHAPE}"
    sources = assets.adapters[ADAPTER_SHAPE]
    server.wait_swapped(adapter, store.publish(adapter, sources[0]))
    swap_blocks = max(1, round(seconds / BLOCK_S))
    per_block = int(BLOCK_S / swap_every)
    publishes: list[tuple[float, str]] = []
    blocks: list[tuple[str, float, float]] = []  # kind, start, end
    progress = Progress("swaps", swap_blocks * per_block)
    with StreamLoad(server.url, adapter, [MAX_TOKENS] * CLIENTS, STAGGER_S) as load:
        load.wait_warm()
        start = block_start = time.time()
        for index in range(2 * swap_blocks + 1):
            kind = "swaps" if index % 2 else "quiet"
            for publish in range(per_block if kind == "swaps" else 0):
                time.sleep(max(0.0, block_start + publish * swap_every - time.time()))
                source = sources[(len(publishes) + 1) % len(sources)]
                publishes.append((time.time(), store.publish(adapter, source)))
                progress.advance()
            time.sleep(max(0.0, block_start + BLOCK_S - time.time()))
            blocks.append((kind, block_start, block_start + BLOCK_S))
            block_start += BLOCK_S
        end = time.time()
    store.retire(adapter)
    measured = [(kind, a + swap_every, b) for kind, a, b in blocks]
    served = {s.model.partition("@")[2] for s in load.streams if s.model}
    result: dict[str, Any] = {
        "clients": CLIENTS,
        "max_tokens": MAX_TOKENS,
        "swap_every_s": swap_every,
        "block_s": BLOCK_S,
        "settle_s": swap_every,
        "blocks": [{"kind": kind, "start_s": a - start, "end_s": b - start, **_phase(load.streams, [(a, b)])}
                   for kind, a, b in measured],  # fmt: skip
        "published": len(publishes),
        "published_versions_served": sum(1 for _, version in publishes if version in served),
        "publish_times": [t - start for t, _ in publishes],
        "stream_errors": load.errors,
        "timeline": _timeline(load.streams, start, end),
    }
    for name, kind in (("no_swaps", "quiet"), ("swaps", "swaps")):
        result[name] = _phase(load.streams, [(a, b) for k, a, b in measured if k == kind])
    result["paired"] = _paired(load.streams, measured)
    return result


def _phase(streams: list[Stream], windows: list[tuple[float, float]]) -> dict[str, Any]:
    """Tokens/s and inter-token gaps of the chunks that arrived inside ``windows``."""
    tokens, gaps = _tokens(streams, windows), _gaps(streams, windows)
    duration = sum(b - a for a, b in windows)
    return {"seconds": duration, "tokens": tokens, "tokens_per_s": tokens / duration, "itl": summary(gaps)}


def _tokens(streams: list[Stream], windows: list[tuple[float, float]]) -> int:
    return sum(n for s in streams for t, n in zip(s.chunk_times, s.chunk_tokens) if _inside(t, windows))


def _gaps(streams: list[Stream], windows: list[tuple[float, float]]) -> list[float]:
    return [b - a for s in streams for a, b in s.gaps() if _inside(b, windows)]


def _inside(t: float, windows: list[tuple[float, float]]) -> bool:
    return any(a <= t < b for a, b in windows)


def _paired(streams: list[Stream], measured: list[tuple[str, float, float]]) -> dict[str, Any]:
    """Each swap block's throughput over the mean of its two quiet neighbours; the p99
    inter-token latency of the swap blocks over the quiet ones'. 95% intervals by
    resampling blocks (seeded: a report can be rewritten from the same blocks)."""
    rate = [_tokens(streams, [(a, b)]) / (b - a) for _, a, b in measured]
    throughput = np.array([rate[i] / ((rate[i - 1] + rate[i + 1]) / 2) for i in range(1, len(measured), 2)])
    gaps = [np.array(_gaps(streams, [(a, b)])) for _, a, b in measured]
    quiet, swapping = gaps[0::2], gaps[1::2]
    rng = np.random.default_rng(0)

    def p99_ratio(swap_blocks: list[np.ndarray], quiet_blocks: list[np.ndarray]) -> float:
        return float(np.percentile(np.concatenate(swap_blocks), 99) / np.percentile(np.concatenate(quiet_blocks), 99))

    means, p99s = [], []
    for _ in range(BOOTSTRAP_SAMPLES):
        means.append(rng.choice(throughput, len(throughput)).mean())
        p99s.append(p99_ratio([swapping[i] for i in rng.integers(len(swapping), size=len(swapping))],
                              [quiet[i] for i in rng.integers(len(quiet), size=len(quiet))]))  # fmt: skip
    return {
        "pairs": len(throughput),
        "throughput_ratios": throughput.tolist(),
        "throughput": float(throughput.mean()),
        "throughput_ci95": np.percentile(means, [2.5, 97.5]).tolist(),
        "p99_itl": p99_ratio(swapping, quiet),
        "p99_itl_ci95": np.percentile(p99s, [2.5, 97.5]).tolist(),
    }


def _timeline(streams: list[Stream], start: float, end: float) -> dict[str, list[float]]:
    """Output tokens/s in ``BIN_S`` bins from the start of the measured load."""
    chunks = [(t - start, n) for s in streams for t, n in zip(s.chunk_times, s.chunk_tokens) if start <= t < end]
    edges = np.arange(0.0, end - start + BIN_S, BIN_S)
    counts, _ = np.histogram([t for t, _ in chunks], bins=edges, weights=[n for _, n in chunks])
    return {"bin_start_s": edges[:-1].tolist(), "tokens_per_s": (counts / BIN_S).tolist()}


def targets(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Throughput ≥ 98% of no-swap; p99 ITL ≤ 1.1× no-swap (issue 14: no regression).
    Judged on the paired estimates; the 95% interval says whether a run could tell."""
    paired = result["paired"]
    throughput, itl = paired["throughput"], paired["p99_itl"]
    return {
        "throughput": {"measured": throughput, "limit": THROUGHPUT_MIN, "ratio": throughput / THROUGHPUT_MIN,
                       "met": throughput >= THROUGHPUT_MIN, "ci95": paired["throughput_ci95"]},
        "p99_itl": {"measured": itl, "limit": ITL_P99_MAX, "ratio": itl / ITL_P99_MAX, "met": itl <= ITL_P99_MAX,
                    "ci95": paired["p99_itl_ci95"]},
    }  # fmt: skip
