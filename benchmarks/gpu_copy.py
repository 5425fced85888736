"""Host-to-device copies of adapter-sized tensors: pinned against pageable host memory.

An install copies a staged adapter into a preallocated LoRA slot. On a GPU the
copy's speed depends on whether the staged host copy is pinned (page-locked,
DMA straight from it) or pageable (the driver bounces it through a pinned
buffer). Needs only torch and a CUDA device; where there is none it says so
instead of measuring. Runs on its own too::

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
    return {"measured": True, "device": torch.cuda.get_device_name(device), "sizes": results}


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
