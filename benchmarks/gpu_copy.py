"""Host-to-device copies of adapter-sized tensors: pinned against pageable host memory,
and a staging copy on a side stream while the engine's matmuls run.

Staging copies an adapter into a preallocated LoRA slot while the engine runs.
On a GPU the copy's speed depends on whether the staged host copy is pinned
(page-locked, DMA straight from it) or pageable (the driver bounces it through
a pinned buffer); :func:`overlap` measures how long a pinned copy on its own
stream takes while a matmul loop runs on the default stream, and how much it
slows that loop. Needs only torch and a CUDA device; where there is none it
says so instead of measuring. Runs on its own too::

    python -m benchmarks.gpu_copy            # prints the results as JSON
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping
from typing import Any

import torch

NO_GPU = "not measured: no GPU on this machine"


def measure(sizes: Mapping[str, int], repeats: int = 20) -> dict[str, Any]:
    """Per label in ``sizes`` (bytes): median seconds and bytes/s of ``copy_`` from a pinned
    and from a pageable host tensor into a preallocated device tensor of the same size."""
    if not torch.cuda.is_available():
        return {"measured": False, "note": NO_GPU}
    device = torch.device("cuda")
    results: dict[str, Any] = {}
    for label, nbytes in sizes.items():
        numel = nbytes // 4
        slot = torch.empty(numel, dtype=torch.float32, device=device)
        pageable = torch.rand(numel)
        pinned = pageable.clone().pin_memory()
        results[label] = {
            "bytes": nbytes,
            "pinned": _time_copies(slot, pinned, repeats),
            "pageable": _time_copies(slot, pageable, repeats),
        }
    return {
        "measured": True,
        "device": torch.cuda.get_device_name(device),
        "sizes": results,
        "overlap": {label: overlap(nbytes) for label, nbytes in sizes.items()},
    }


def overlap(nbytes: int, matmuls: int = 50, size: int = 4096) -> dict[str, float]:
    """A ``non_blocking`` copy of ``nbytes`` from pinned memory on a side stream (as staging
    does), alone and while ``matmuls`` ``size``² matmuls run on the default stream: the copy's
    seconds both ways, and the matmul loop's seconds without and with the copy beside it."""
    device = torch.device("cuda")
    slot = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    source = torch.rand(nbytes // 4).pin_memory()
    a = torch.rand(size, size, device=device)
    side = torch.cuda.Stream()

    def timed(stream: torch.cuda.Stream, work: Any) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            work()
            end.record(stream)
        return start, end

    def loop() -> None:
        for _ in range(matmuls):
            a @ a

    def copy() -> None:
        slot.copy_(source, non_blocking=True)

    default = torch.cuda.current_stream()
    timed(default, loop)  # warm-up
    timed(side, copy)
    torch.cuda.synchronize()
    results = {}
    for name, runs in (
        ("matmuls_alone", [(default, loop)]),
        ("copy_alone", [(side, copy)]),
        ("together", [(default, loop), (side, copy)]),
    ):
        events = [timed(stream, work) for stream, work in runs]
        torch.cuda.synchronize()
        seconds = [start.elapsed_time(end) / 1000 for start, end in events]
        if name == "together":
            results["matmuls_with_copy_s"], results["copy_with_matmuls_s"] = seconds
        else:
            results[f"{name}_s"] = seconds[0]
    results["matmul_slowdown"] = results["matmuls_with_copy_s"] / results["matmuls_alone_s"]
    return results


def _time_copies(slot: torch.Tensor, source: torch.Tensor, repeats: int) -> dict[str, float]:
    slot.copy_(source, non_blocking=True)  # warm-up: allocator, driver paths
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    seconds = []
    for _ in range(repeats):
        start.record()
        # non_blocking only overlaps with the host when the source is pinned; either
        # way the events time the copy on the device's stream.
        slot.copy_(source, non_blocking=True)
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1000)
    median = statistics.median(seconds)
    nbytes = source.numel() * source.element_size()
    return {"median_s": median, "bytes_per_s": nbytes / median}


if __name__ == "__main__":
    from .assets import prepare

    assets = prepare()
    print(json.dumps(measure({label: assets.adapter_bytes(label) for label in assets.adapters}), indent=2))
