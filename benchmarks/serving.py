"""Benchmark 3: serving under swaps against serving without them.

16 clients stream completions from the adapter without pause. The load run
alternates blocks without swaps and blocks with a new version published every
``swap_every`` seconds, quiet first and last: quiet, swaps, quiet, …, quiet.
This machine's speed wanders by several per cent from one half-minute to the
next (a single-threaded matmul loop on the idle machine: 7.5% coefficient of
variation in 0.5 s samples), so one long phase against another measures the
wander. Each swap block against the mean of the quiet blocks on either side
cancels it to first order, and the spread of those pairs gives the figure a
confidence interval.

Publishing is a trainer's work, done on another machine in production but here
on the two cores the engine uses (8.7 ms of CPU per 2 MB version, measured
alone). So that it weighs on both sides alike, the quiet blocks publish as
many versions of the same adapter at the same times into a second store that
no engine watches: the only difference between the blocks is the engine
following the store.

The first ``SETTLE_S`` of each block are left out, so that a swap block is
measured once its first version is being served. Requests begun in one block
still run into the next for up to a request's length (about 6 s here), and
the versions a swap block leaves behind retire during the quiet block after
it: that cost is counted against no swaps, so the figure leans, if anything,
towards a smaller cost of swapping.
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
SETTLE_S = 2.0
BIN_S = 1.0
MIN_PAIRS_FOR_INTERVAL = 4
# Student's t, 97.5th percentile, for 1 to 30 degrees of freedom.
T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)

THROUGHPUT_MIN = 0.98
ITL_P99_MAX = 1.1


def run(
    server: Server, store: CheckpointStore, assets: Assets, seconds: float, swap_every: float = 2.0
) -> dict[str, Any]:
    """``seconds`` with swaps in all, in blocks of ``BLOCK_S``; one quiet block more."""
    adapter = f"serve-{ADAPTER_SHAPE}"
    sources = assets.adapters[ADAPTER_SHAPE]
    server.wait_swapped(adapter, store.publish(adapter, sources[0]))
    swap_blocks = max(1, round(seconds / BLOCK_S))
    per_block = int(BLOCK_S / swap_every)
    unwatched = CheckpointStore(store.root.parent / f"{store.root.name}-unwatched")
    publishes: list[tuple[float, str]] = []
    blocks: list[tuple[str, float, float]] = []  # kind, start, end
    progress = Progress("swaps", swap_blocks * per_block)
    with StreamLoad(server.url, adapter, [MAX_TOKENS] * CLIENTS, STAGGER_S) as load:
        load.wait_warm()
        start = block_start = time.time()
        for index in range(2 * swap_blocks + 1):
            kind = "swaps" if index % 2 else "quiet"
            for publish in range(per_block):
                time.sleep(max(0.0, block_start + publish * swap_every - time.time()))
                source = sources[(len(publishes) + 1) % len(sources)]
                if kind == "quiet":
                    unwatched.publish(adapter, source)
                else:
                    publishes.append((time.time(), store.publish(adapter, source)))
                    progress.advance()
            time.sleep(max(0.0, block_start + BLOCK_S - time.time()))
            blocks.append((kind, block_start, block_start + BLOCK_S))
            block_start += BLOCK_S
        end = time.time()
    store.retire(adapter)
    measured = [(kind, a + SETTLE_S, b) for kind, a, b in blocks]
    served = {s.model.partition("@")[2] for s in load.streams if s.model}
    result: dict[str, Any] = {
        "clients": CLIENTS,
        "max_tokens": MAX_TOKENS,
        "swap_every_s": swap_every,
        "block_s": BLOCK_S,
        "settle_s": SETTLE_S,
        "blocks": [
            {"kind": kind, "start_s": a - start, "end_s": b - start, **_phase(load.streams, [(a, b)])}
            for kind, a, b in measured
        ],
        "published": len(publishes),
        "published_versions_served": sum(1 for _, version in publishes if version in served),
        "publish_times": [t - start for t, _ in publishes],
        "stream_errors": load.errors,
        "timeline": _timeline(load.streams, start, end),
    }
    for name, kind in (("no_swaps", "quiet"), ("swaps", "swaps")):
        result[name] = _phase(load.streams, [(a, b) for k, a, b in measured if k == kind])
    result["paired"] = _paired(result["blocks"])
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


def _paired(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """From the blocks' figures (:func:`_phase`, quiet first and last): per swap block, its
    throughput and its p99 inter-token latency over the mean of its two quiet neighbours';
    the mean over the blocks, with a 95% interval. A block without tokens or gaps makes its
    pair's figures NaN."""
    rate = [block["tokens_per_s"] for block in blocks]
    p99 = [block["itl"].get("p99", float("nan")) for block in blocks]
    pairs = range(len(blocks) // 2)
    result: dict[str, Any] = {"pairs": len(pairs)}
    for name, values in (("throughput", rate), ("p99_itl", p99)):
        ratios = np.array([_ratio(values[2 * i + 1], (values[2 * i] + values[2 * i + 2]) / 2) for i in pairs])
        result[f"{name}_ratios"] = ratios.tolist()
        result[name] = float(ratios.mean())
        result[f"{name}_ci95"] = _interval(ratios)
    return result


def _interval(ratios: np.ndarray) -> list[float] | None:
    """Student's t interval of the mean. Neighbouring pairs share a quiet block, so their
    ratios move together: the variance takes in that lag-1 covariance (with it, 93–95% of
    such intervals held the true ratio in a simulation of 4 to 12 pairs under independent
    or drifting block speeds; 92% without). None for too few pairs, or a NaN among them."""
    count = len(ratios)
    if count < MIN_PAIRS_FOR_INTERVAL or not np.isfinite(ratios).all():
        return None
    deviations = ratios - ratios.mean()
    covariance = max(float((deviations[1:] * deviations[:-1]).sum()), 0.0)
    variance = (float((deviations**2).sum()) + 2 * covariance) / (count - 1) / count
    df = count - 1
    t = T975[df - 1] if df <= len(T975) else 1.96 + 2.4 / df  # beyond the table: Cornish-Fisher's first term
    half = t * variance**0.5
    return [float(ratios.mean()) - half, float(ratios.mean()) + half]


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


def _timeline(streams: list[Stream], start: float, end: float) -> dict[str, list[float]]:
    """Output tokens/s in ``BIN_S`` bins from the start of the measured load."""
    chunks = [(t - start, n) for s in streams for t, n in zip(s.chunk_times, s.chunk_tokens) if start <= t < end]
    edges = np.arange(0.0, end - start + BIN_S, BIN_S)
    counts, _ = np.histogram([t for t, _ in chunks], bins=edges, weights=[n for _, n in chunks])
    return {"bin_start_s": edges[:-1].tolist(), "tokens_per_s": (counts / BIN_S).tolist()}


def targets(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Throughput ≥ 98% of no-swap; p99 ITL ≤ 1.1× no-swap (issue 14: no regression).
    Judged on the paired estimates (NaN: not met); the 95% interval says whether a run
    could tell."""
    paired = result["paired"]
    throughput, itl = paired["throughput"], paired["p99_itl"]
    return {
        "throughput": {
            "measured": throughput,
            "limit": THROUGHPUT_MIN,
            "ratio": throughput / THROUGHPUT_MIN,
            "met": throughput >= THROUGHPUT_MIN,
            "ci95": paired["throughput_ci95"],
        },
        "p99_itl": {
            "measured": itl,
            "limit": ITL_P99_MAX,
            "ratio": itl / ITL_P99_MAX,
            "met": itl <= ITL_P99_MAX,
            "ci95": paired["p99_itl_ci95"],
        },
    }
