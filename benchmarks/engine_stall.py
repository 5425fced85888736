"""Benchmark 2: how long a swap holds the engine loop, ours against vLLM's native reload.

Our path reports ``engine_stall`` itself (how long the worker's install held
the slot lock a step's start takes; the install is a flip made while the engine
runs). Both paths are also measured from outside, the same way: two clients
stream long completions from the base model the whole time, and a swap's
stall is the largest inter-token gap that overlaps it minus the median gap
away from any swap. The streams use the base model, not the adapter, because
vLLM 0.32's sticky ``load_inplace`` flag makes every step that runs the
natively reloaded adapter re-read it from disk (measured separately below).

Swaps of the two paths alternate on the same server, on the same adapter
files, so both see the same machine. The floor is the adapter's bytes over
this machine's memory-copy bandwidth.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from vllm_lora_hotswap.store import CheckpointStore

from .assets import SHAPES, Assets
from .common import Progress, Server, Stream, StreamLoad, gaps_between, gaps_outside, summary

# Two clients of different lengths: when one request ends (no gap to measure
# until its successor's first token), the other is still mid-stream.
STREAM_TOKENS = (440, 310)
STICKY_SHAPE = "r64-all"
SETTLE_S = 0.2  # quiet time between swaps, so no gap belongs to two windows


def memory_bandwidth(nbytes: int = 256 << 20, repeats: int = 10) -> dict[str, float]:
    """Median bytes/s of ``copy_`` into a preallocated tensor, and of ``zero_``
    (vLLM clears a whole max-rank slot before copying an adapter into it)."""
    source = torch.rand(nbytes // 4)
    target = torch.empty_like(source)
    target.copy_(source)  # touch every page before timing

    def rate(operation: Any) -> float:
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            operation()
            seconds.append(time.perf_counter() - start)
        return nbytes / statistics.median(seconds)

    return {
        "copy_bytes_per_s": rate(lambda: target.copy_(source)),
        "zero_bytes_per_s": rate(target.zero_),
        "buffer_bytes": nbytes,
    }


def slot_bytes(hidden: int, intermediate: int, layers: int, max_rank: int) -> int:
    """Float32 bytes of one LoRA slot of a Llama at ``max_rank``: vLLM wraps q/k/v, o,
    gate/up and down, and every slot holds A (rank × in) and B (out × rank) for each."""
    in_out = [(hidden, hidden)] * 4 + [(hidden, intermediate)] * 2 + [(intermediate, hidden)]
    return layers * sum(max_rank * (i + o) for i, o in in_out) * 4


def copy_floor(results: dict[str, Any], label: str) -> float:
    """Seconds to copy the adapter's bytes at this machine's copy bandwidth."""
    return results["adapters"][label]["bytes"] / results["memory_bandwidth"]["copy_bytes_per_s"]


def slot_floor(results: dict[str, Any], label: str) -> float:
    """What vLLM's ``activate_adapter`` writes: the whole max-rank slot zeroed, then the adapter copied."""
    return results["slot_bytes"] / results["memory_bandwidth"]["zero_bytes_per_s"] + copy_floor(results, label)


def run(server: Server, store: CheckpointStore, assets: Assets, swaps: int, sticky_seconds: float) -> dict[str, Any]:
    base_model = str(assets.model)
    per_shape: dict[str, dict[str, Any]] = {}
    with StreamLoad(server.url, base_model, STREAM_TOKENS) as load:
        load.wait_warm()
        progress = Progress("swaps", swaps * len(SHAPES))
        for shape in SHAPES:
            per_shape[shape.label] = _swap_shape(server, store, assets, shape.label, swaps, progress)
    windows = [w for r in per_shape.values() for swap in r["ours"] + r["native"] for w in swap["windows"].values()]
    quiet_gaps = gaps_outside(load.streams, windows)
    baseline = statistics.median(quiet_gaps)
    for result in per_shape.values():
        _external_stalls(result, load.streams, baseline)
    return {
        "stream_tokens": STREAM_TOKENS,
        "baseline_gap": summary(quiet_gaps),
        "stream_errors": load.errors,
        "shapes": per_shape,
        "sticky_load_inplace": sticky_cost(server, assets, sticky_seconds),
    }


def _swap_shape(
    server: Server, store: CheckpointStore, assets: Assets, label: str, swaps: int, progress: Progress
) -> dict[str, Any]:
    adapter, native = f"stall-{label}", f"native-{label}"
    sources = assets.adapters[label]
    server.wait_swapped(adapter, store.publish(adapter, sources[0]))
    load_native(server, native, str(sources[0]), inplace=False)
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    for index in range(swaps):
        source = sources[(index + 1) % len(sources)]
        version = store.publish(adapter, source)
        committed = (store.version_dir(adapter, version) / "READY").stat().st_mtime
        swap = server.wait_swapped(adapter, version)["last_swap"]
        done = time.time()
        timings = swap["timings"]
        # Phases run in order and end with the switch, so the install's wall-clock
        # window is found by walking back from the record's finish time.
        install_end = swap["finished_at"] - timings["switch"] - timings.get("probe", 0.0)
        ours.append(
            {
                "engine_stall_s": timings["engine_stall"],
                "install_s": timings["install"],
                "windows": {"install": (install_end - timings["install"], install_end), "swap": (committed, done)},
            }
        )
        time.sleep(SETTLE_S)
        start = time.time()
        load_native(server, native, str(source), inplace=True)
        end = time.time()
        theirs.append({"request_s": end - start, "windows": {"request": (start, end)}})
        time.sleep(SETTLE_S)
        progress.advance()
    # Frees our slot (vLLM 0.32 cannot free a native one: /v1/unload_lora_adapter leaves it taken).
    store.retire(adapter)
    return {"adapter_bytes": assets.adapter_bytes(label), "ours": ours, "native": theirs}


def load_native(server: Server, name: str, path: str, *, inplace: bool) -> None:
    body = {"lora_name": name, "lora_path": path, "load_inplace": inplace}
    response = server.http.post("/v1/load_lora_adapter", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"/v1/load_lora_adapter answered {response.status_code}: {response.text[:300]}")


def _external_stalls(result: dict[str, Any], streams: list[Stream], baseline: float) -> None:
    """Each swap window's largest overlapping gap minus the quiet median (None: no gap overlapped)."""
    for swap in result["ours"] + result["native"]:
        swap["external_stall_s"] = {}
        for name, (start, end) in swap["windows"].items():
            gaps = gaps_between(streams, start, end)
            swap["external_stall_s"][name] = max(gaps) - baseline if gaps else None
    result["summary"] = {
        "ours_engine_stall": summary([s["engine_stall_s"] for s in result["ours"]]),
        "ours_external_install": _external(result["ours"], "install"),
        "ours_external_whole_swap": _external(result["ours"], "swap"),
        "native_external": _external(result["native"], "request"),
        "native_request": summary([s["request_s"] for s in result["native"]]),
    }


def _external(swaps: list[dict[str, Any]], window: str) -> dict[str, float]:
    return summary([s["external_stall_s"][window] for s in swaps if s["external_stall_s"][window] is not None])


def sticky_cost(server: Server, assets: Assets, seconds: float) -> dict[str, Any]:
    """Steady-state inter-token latency on an adapter last loaded with ``load_inplace=true``
    (vLLM 0.32 re-reads it from disk at every step) against the same weights loaded plainly."""
    sticky, clean = f"native-{STICKY_SHAPE}", f"native-clean-{STICKY_SHAPE}"
    load_native(server, clean, str(assets.adapters[STICKY_SHAPE][0]), inplace=False)
    result: dict[str, Any] = {"adapter_shape": STICKY_SHAPE}
    for key, model in (("clean", clean), ("sticky", sticky)):
        with StreamLoad(server.url, model, (STREAM_TOKENS[0],)) as load:
            load.wait_warm()
            time.sleep(seconds)
        result[key] = summary([b - a for s in load.streams for a, b in s.gaps()])
    return result
