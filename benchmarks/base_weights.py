"""Benchmark 5: base-weight sync over the gloo transport against gloo's own ceiling.

The push is a full ``WeightSync.send`` of the benchmark model into a server
started with ``--weight-transfer-config '{"backend": "gloo"}'``: pause, every
parameter broadcast in buckets and loaded layer-wise, finish (adapters put
back, prefix cache reset), resume. The ceiling is a plain gloo broadcast of
the same number of bytes between two processes of this machine, over the same
kind of stateless process group the transport uses. NCCL is measured only
where a GPU exists.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from typing import Any

import torch

from vllm_lora_hotswap.engine.gloo_transfer import join_group
from vllm_lora_hotswap.weight_sync import FleetWeightSyncClient, WeightSync

from .assets import Assets
from .common import Progress, Server, free_port

LIMIT = 0.70  # push throughput / ceiling
GROUP_TIMEOUT_S = 300.0


def push(server: Server, assets: Assets, repeats: int) -> dict[str, Any]:
    """Bytes/s of full pushes of the benchmark's own weights (so serving is unchanged)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets.model, dtype=torch.float32)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sync = WeightSync(FleetWeightSyncClient([server.url]), backend="gloo", master_port=free_port())
    seconds = []
    progress = Progress("pushes", repeats)
    try:
        for index in range(repeats):
            start = time.perf_counter()
            sync.send(model, weight_version=f"bench-{index}")
            seconds.append(time.perf_counter() - start)
            progress.advance()
    finally:
        sync.close()
    return {"bytes": nbytes, "seconds": seconds, "bytes_per_s": nbytes / statistics.median(seconds)}


def _receive(port: int, nbytes: int, repeats: int) -> None:
    """Rank 1 of the ceiling measurement: receive, then acknowledge, ``repeats`` times."""
    group = join_group("127.0.0.1", port, 1, 2, GROUP_TIMEOUT_S)
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    ack = torch.zeros(1, dtype=torch.uint8)
    for _ in range(repeats):
        group.broadcast(buffer, 0).wait()
        group.broadcast(ack, 1).wait()


def ceiling(nbytes: int, repeats: int) -> dict[str, Any]:
    """Bytes/s of one plain gloo broadcast of ``nbytes`` to a second process, timed on the
    sender until the receiver's 1-byte acknowledgement arrives (so the data has landed)."""
    port = free_port()
    peer = multiprocessing.get_context("spawn").Process(target=_receive, args=(port, nbytes, repeats), daemon=True)
    peer.start()
    try:
        group = join_group("127.0.0.1", port, 0, 2, GROUP_TIMEOUT_S)
        buffer = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
        ack = torch.zeros(1, dtype=torch.uint8)
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            group.broadcast(buffer, 0).wait()
            group.broadcast(ack, 1).wait()
            seconds.append(time.perf_counter() - start)
    finally:
        peer.join(60)
        if peer.is_alive():
            peer.kill()
    return {"bytes": nbytes, "seconds": seconds, "bytes_per_s": nbytes / statistics.median(seconds)}


def target(pushed: dict[str, Any], plain: dict[str, Any]) -> dict[str, Any]:
    fraction = pushed["bytes_per_s"] / plain["bytes_per_s"]
    return {"measured": fraction, "limit": LIMIT, "ratio": fraction / LIMIT, "met": fraction >= LIMIT}
