"""Benchmark 7: how long an install holds the engine, against adapter size and slot size.

Staging writes the adapter into a free LoRA slot while the engine runs, so the
install only flips the slot's mapping (for a new slot id on the worker while
the engine runs, sent over the stage channel): its cost should not depend on
the adapter (1 MB to 160 MB here) or on the slot (``--max-lora-rank`` 16, 64,
256). One server per rank streams two long completions from the base model
while adapters of each size that fits swap in; per swap:

* **ours**: the instance's ``engine_stall``: how long the worker's flip held the
  slot lock that a step's start takes (an install that went by RPC between two
  steps: how long it held the engine core, the round trip to the worker included);
* **any RPC**: ``GET /v1/lora/workers``, a worker RPC that only reads, timed as
  an RPC's hold of the engine core (its ``rpc_held_s``): what any install between
  two steps would cost;
* **native**: vLLM's in-place reload of the same files
  (``/v1/load_lora_adapter`` with ``load_inplace``; vLLM reads and copies the
  adapter in its ``add_lora`` utility, between two steps), from the streams:
  the largest inter-token gap overlapping the request minus the quiet median;
* the **copy floor**: the adapter's bytes at this machine's copy bandwidth.

Targets (issue 14): ours p50 ≤ max(1 ms, 1.5 × any-RPC p50) at every size and
rank, and ours p50 (largest adapter) ÷ ours p50 (smallest) ≤ 1.5.

Part of ``make bench``; alone: ``python -m benchmarks.slot_stall [--swaps N]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from vllm_lora_hotswap.store import CheckpointStore

from .assets import ALL_LINEAR, QV, AdapterShape, Assets, prepare
from .common import (
    EVENTS_POLL_S,
    Progress,
    Server,
    StreamLoad,
    gaps_between,
    gaps_outside,
    plugin_server,
    stage,
    summary,
)
from .engine_stall import STREAM_TOKENS, load_native, memory_bandwidth

RANKS = (16, 64, 256)
# About 1, 10, 40 and 160 MB of float32 LoRA weights on the bench model.
SIZES = (
    AdapterShape(8, QV),
    AdapterShape(16, ALL_LINEAR),
    AdapterShape(64, ALL_LINEAR),
    AdapterShape(256, ALL_LINEAR),
)
SETTLE_S = 0.2
RPC_FACTOR = 1.5
STALL_FLOOR_S = 0.001
SPREAD_LIMIT = 1.5


def run(assets: Assets, tmp: Path, swaps: int) -> dict[str, Any]:
    bandwidth = memory_bandwidth()
    ranks: dict[str, Any] = {}
    for rank in RANKS:
        shapes = [shape for shape in SIZES if shape.rank <= rank]
        stage(f"  --max-lora-rank {rank}: {len(shapes)} adapter sizes × {swaps} swaps")
        server, store = plugin_server(
            assets,
            tmp,
            f"slots-r{rank}",
            events=True,
            poll_s=EVENTS_POLL_S,
            extra_args=["--max-lora-rank", str(rank), "--max-loras", "2"],
        )
        with server:
            ranks[str(rank)] = _one_server(server, store, assets, shapes, swaps)
    for per_rank in ranks.values():
        for label, result in per_rank["sizes"].items():
            result["copy_floor_s"] = assets.adapter_bytes(label) / bandwidth["copy_bytes_per_s"]
    return {"memory_bandwidth": bandwidth, "ranks": ranks, "swaps": swaps}


def _one_server(
    server: Server, store: CheckpointStore, assets: Assets, shapes: list[AdapterShape], swaps: int
) -> dict[str, Any]:
    sizes: dict[str, Any] = {}
    with StreamLoad(server.url, str(assets.model), STREAM_TOKENS) as load:
        load.wait_warm()
        progress = Progress("swaps", swaps * len(shapes))
        for shape in shapes:
            sizes[shape.label] = _swap(server, store, assets, shape.label, swaps, progress)
    windows = [w for result in sizes.values() for w in result.pop("windows")]
    baseline = statistics.median(gaps_outside(load.streams, windows))
    for result in sizes.values():
        native = [
            max(gaps) - baseline
            for start, end in result.pop("native_windows")
            if (gaps := gaps_between(load.streams, start, end))
        ]
        result["native_external"] = summary(native)
    workers = server.http.get("/v1/lora/workers").json()["workers"]
    return {
        "baseline_gap_s": baseline,
        "sizes": sizes,
        "stream_errors": load.errors,
        "installs": {key: sum(w[key] for w in workers) for key in ("slot_writes", "step_copies", "slots_lost")},
    }


def _swap(
    server: Server, store: CheckpointStore, assets: Assets, label: str, swaps: int, progress: Progress
) -> dict[str, Any]:
    adapter, native = f"slot-{label}", f"native-{label}"
    sources = assets.adapters[label]
    server.wait_swapped(adapter, store.publish(adapter, sources[0]))
    load_native(server, native, str(sources[0]), inplace=False)
    ours, any_rpc, stage_s, windows, native_windows = [], [], [], [], []
    for index in range(swaps):
        source = sources[(index + 1) % len(sources)]
        started = time.time()
        swap = server.wait_swapped(adapter, store.publish(adapter, source))["last_swap"]
        windows.append((started, time.time()))
        ours.append(swap["timings"]["engine_stall"])
        stage_s.append(swap["timings"]["stage"])
        time.sleep(SETTLE_S)
        any_rpc.append(server.http.get("/v1/lora/workers").json()["rpc_held_s"])
        started = time.time()
        load_native(server, native, str(source), inplace=True)
        native_windows.append((started, time.time()))
        windows.append(native_windows[-1])
        time.sleep(SETTLE_S)
        progress.advance()
    store.retire(adapter)
    return {
        "adapter_bytes": assets.adapter_bytes(label),
        "ours": summary(ours),
        "any_rpc": summary(any_rpc),
        "stage": summary(stage_s),
        "windows": windows,
        "native_windows": native_windows,
    }


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """Per rank and size: ours vs max(1 ms, 1.5 × any RPC); and the spread of ours over all."""
    rows = []
    for rank, per_rank in result["ranks"].items():
        for label, size in per_rank["sizes"].items():
            limit = max(STALL_FLOOR_S, RPC_FACTOR * size["any_rpc"]["p50"])
            rows.append(
                {
                    "rank": int(rank),
                    "label": label,
                    "ours_s": size["ours"]["p50"],
                    "limit_s": limit,
                    "ratio": size["ours"]["p50"] / limit,
                    "met": size["ours"]["p50"] <= limit,
                }
            )
    stalls = [row["ours_s"] for row in rows]
    spread = max(stalls) / min(stalls)
    return {"rows": rows, "spread": spread, "spread_met": spread <= SPREAD_LIMIT}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.slot_stall", description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "slot_stall.json")
    options = parser.parse_args()
    tmp = options.out.parent / "tmp-slot-stall"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    assets = prepare(shapes=SIZES)
    result = run(assets, tmp, options.swaps)
    result["targets"] = targets(result)
    options.out.write_text(json.dumps(result, indent=2))
    for row in result["targets"]["rows"]:
        print(
            f"  r{row['rank']:<4} {row['label']:<8} ours {1000 * row['ours_s']:.2f} ms, limit {1000 * row['limit_s']:.2f} ms: "
            f"{'met' if row['met'] else 'MISSED'}"
        )
    print(
        f"  spread largest/smallest: {result['targets']['spread']:.2f} ({'met' if result['targets']['spread_met'] else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
