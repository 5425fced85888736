"""Benchmark 5: base-weight sync over the gloo transport against gloo's own ceiling.

The push is a full ``WeightSync.send`` of the benchmark model into a server
started with ``--weight-transfer-config '{"backend": "gloo"}'``: pause, every
parameter broadcast in buckets and loaded layer-wise, finish (adapters put
back, prefix cache reset), resume. The ceiling is a plain gloo broadcast of
the same number of bytes between two processes of this machine, over the same
kind of stateless process group the transport uses, into a buffer the
receiver already holds.

Pushes and plain broadcasts alternate, one of each per pair, so both see the
same machine (on 2 cores another job's load moves both): the figure is the
mean of the pairs' ratios, with a Student's t interval. Each push is also
split into its phases, the trainer's (spec check, pause, the workers' check,
the buckets on the wire, the workers' load, finish) and the workers' own
(receiving, loading, from the server's log). NCCL is measured only where a
GPU exists.
"""

from __future__ import annotations

import multiprocessing
import re
import statistics
import time
from typing import Any

import torch

from hotswap_devkit.server import free_port
from vllm_lora_hotswap.weights.gloo import join_group
from vllm_lora_hotswap.weights.trainer import FleetWeightSyncClient, WeightSync

from .assets import Assets
from .common import Progress, Server
from .serving import MIN_PAIRS_FOR_INTERVAL, T975

LIMIT = 0.70  # push throughput / ceiling
GROUP_TIMEOUT_S = 300.0
WARM_UP = 1  # pairs run first and left out: the first push allocates the trainer's buffers
WORKER_LOG = re.compile(r"hotswap gloo weights received .*receiving=([\d.]+) loading=([\d.]+)")


def run(server: Server, assets: Assets, repeats: int) -> dict[str, Any]:
    """``repeats`` pairs of one full push of the benchmark's own weights (so serving is
    unchanged) and one plain broadcast of the same bytes."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets.model, dtype=torch.float32)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    port = free_port()
    peer = multiprocessing.get_context("spawn").Process(
        target=_receive, args=(port, nbytes, WARM_UP + repeats), daemon=True
    )
    peer.start()
    # keep_buffer: the engine keeps its receive buffer between pushes, as an RL loop that pushes
    # every step would set; it holds host memory the size of the model (off by default).
    sync = WeightSync(FleetWeightSyncClient([server.url]), backend="gloo", master_port=free_port(), keep_buffer=True)
    pushes, plains, phases = [], [], []
    progress = Progress("push / plain broadcast pairs", WARM_UP + repeats)
    try:
        group = join_group("127.0.0.1", port, 0, 2, GROUP_TIMEOUT_S)
        buffer = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
        ack = torch.zeros(1, dtype=torch.uint8)
        for index in range(WARM_UP + repeats):
            logged = server.log_path.stat().st_size
            start = time.perf_counter()
            sync.send(model, weight_version=f"bench-{index}")
            pushed = time.perf_counter() - start
            start = time.perf_counter()
            group.broadcast(buffer, 0).wait()
            group.broadcast(ack, 1).wait()  # the receiver's word that the data has landed
            plain = time.perf_counter() - start
            if index >= WARM_UP:
                pushes.append(pushed)
                plains.append(plain)
                phases.append({**sync.timings, **_worker_phases(server, logged)})
            progress.advance()
    finally:
        sync.close()
        peer.join(60)
        if peer.is_alive():
            peer.kill()
    ratios = [plain / push for push, plain in zip(pushes, plains, strict=True)]
    names = dict.fromkeys(name for row in phases for name in row)
    return {
        "push": {"bytes": nbytes, "seconds": pushes, "bytes_per_s": nbytes / statistics.median(pushes)},
        "ceiling": {"bytes": nbytes, "seconds": plains, "bytes_per_s": nbytes / statistics.median(plains)},
        "ratios": ratios,
        "ratio_ci95": _interval(ratios),
        "phases": {name: statistics.median(row[name] for row in phases if name in row) for name in names},
    }


def _worker_phases(server: Server, offset: int) -> dict[str, float]:
    """The workers' own receiving and loading seconds, from the server's log since ``offset``."""
    for _ in range(20):  # the worker's line can land a moment after the push returns
        with open(server.log_path, "rb") as log:
            log.seek(offset)
            found = WORKER_LOG.findall(log.read().decode(errors="replace"))
        if found:
            receiving, loading = found[-1]
            return {"worker_receiving": float(receiving), "worker_loading": float(loading)}
        time.sleep(0.05)
    return {}


def _receive(port: int, nbytes: int, repeats: int) -> None:
    """Rank 1 of the ceiling measurement: receive, then acknowledge, ``repeats`` times."""
    group = join_group("127.0.0.1", port, 1, 2, GROUP_TIMEOUT_S)
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    ack = torch.zeros(1, dtype=torch.uint8)
    for _ in range(repeats):
        group.broadcast(buffer, 0).wait()
        group.broadcast(ack, 1).wait()


def _interval(ratios: list[float]) -> list[float] | None:
    """Student's t interval of the mean ratio; None for too few pairs."""
    count = len(ratios)
    if count < MIN_PAIRS_FOR_INTERVAL:
        return None
    mean = statistics.fmean(ratios)
    df = count - 1
    t = T975[df - 1] if df <= len(T975) else 1.96 + 2.4 / df
    half = t * statistics.stdev(ratios) / count**0.5
    return [mean - half, mean + half]


def target(sync: dict[str, Any]) -> dict[str, Any]:
    """Push throughput over the ceiling's: the mean of the pairs' ratios (older results
    without pairs: the ratio of the medians)."""
    ratios = sync.get("ratios")
    if ratios:
        fraction = statistics.fmean(ratios)
    else:
        fraction = sync["push"]["bytes_per_s"] / sync["ceiling"]["bytes_per_s"]
    return {
        "measured": fraction,
        "limit": LIMIT,
        "ratio": fraction / LIMIT,
        "met": fraction >= LIMIT,
        "ci95": sync.get("ratio_ci95"),
    }
