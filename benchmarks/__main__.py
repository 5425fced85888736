"""Run every benchmark and write benchmarks/results/ (results.json, results.md, PNG plots).

    python -m benchmarks [--quick]          # or: make bench [QUICK=1]

Two vLLM servers with the plugin: ``events`` (inotify plus a 5 s poll) runs
benchmarks 1–5 and also serves vLLM's native ``/v1/load_lora_adapter`` for
the baseline, side by side; ``polling`` (events off, a 1 s poll) repeats
benchmark 1, then again with the publisher's notice after each publish (an
engine on another node of an NFS store, told by its trainer). Servers, stores and logs live in results/tmp/ while they run
(kept when a run fails, for its server logs).
"""

from __future__ import annotations

import argparse
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hotswap_devkit.server import start_all
from hotswap_devkit.toy_models import BENCH_MODEL
from vllm_lora_hotswap.notify import CommitNotifier

from . import (
    base_weights,
    engine_stall,
    gpu_copy,
    memory,
    parallel_swaps,
    policy_sync,
    publish_latency,
    ray_fleet,
    report,
    serving,
    slot_stall,
)
from .assets import prepare
from .common import EVENTS_POLL_S, SERVER_ARGS, plugin_server, stage
from .machine import describe

RESULTS = Path(__file__).resolve().parent / "results"
POLLING_POLL_S = 1.0
MAX_LORA_RANK = 64
NCCL_NOT_HERE = "not measured: this suite drives vLLM's CPU build (gloo); NCCL needs a CUDA build of vLLM"


@dataclass(frozen=True)
class Plan:
    """How much of everything to do: the full run, or a quick one (``--quick``)."""

    latency_swaps: int
    parallel_rounds: int
    stall_swaps: int
    sticky_seconds: float
    serving_seconds: float
    memory_swaps: int
    pushes: int
    slot_swaps: int

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(
                latency_swaps=15,
                parallel_rounds=5,
                stall_swaps=5,
                sticky_seconds=3,
                serving_seconds=20,
                memory_swaps=100,
                pushes=2,
                slot_swaps=5,
            )
        return cls(
            latency_swaps=50,
            parallel_rounds=10,
            stall_swaps=20,
            sticky_seconds=10,
            serving_seconds=120,
            memory_swaps=1000,
            pushes=5,
            slot_swaps=10,
        )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and shorter phases")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output directory (default: %(default)s)")
    options = parser.parse_args()
    plan = Plan.make(options.quick)
    tmp = options.out / "tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    began = time.time()
    results: dict[str, Any] = {
        "quick": options.quick,
        "plan": plan.__dict__,
        "machine": describe(),
        "servers": {
            "args": list(SERVER_ARGS),
            "events": {"poll_interval_s": EVENTS_POLL_S, "events": True},
            "polling": {"poll_interval_s": POLLING_POLL_S, "events": False},
        },
    }
    load: dict[str, list[float]] = {}  # 1-minute load average when each benchmark starts: a busy machine shows

    stage("assets: benchmark model and adapters (cached in benchmarks/.cache)")
    assets = prepare()
    results["adapters"] = {label: {"bytes": assets.adapter_bytes(label)} for label in assets.adapters}
    stage("memory bandwidth (the copy floor)")
    results["memory_bandwidth"] = engine_stall.memory_bandwidth()
    results["slot_bytes"] = engine_stall.slot_bytes(
        BENCH_MODEL.hidden_size, BENCH_MODEL.intermediate_size, BENCH_MODEL.num_layers, MAX_LORA_RANK
    )

    events, events_store = plugin_server(
        assets,
        tmp,
        "events",
        events=True,
        poll_s=EVENTS_POLL_S,
        extra_args=["--weight-transfer-config", '{"backend": "gloo"}'],
    )
    polling, polling_store = plugin_server(assets, tmp, "polling", events=False, poll_s=POLLING_POLL_S, extra_args=[])
    with ExitStack() as servers:
        stage(
            "starting both servers: events (inotify + 5 s poll, native reload, gloo weight transfer) and polling (1 s)"
        )
        # Side by side: start-up is mostly one core's work each, and an idle server costs nothing.
        for server in (events, polling):
            servers.callback(server.stop)
        start_all((events, polling))
        stage(f"1/5 publish → served with events, {plan.latency_swaps} swaps")
        load["latency_events"] = _loadavg()
        results["latency_events"] = publish_latency.run(events, events_store, assets, plan.latency_swaps, "events")
        stage(f"1/5 publish → served with polling only, {plan.latency_swaps} swaps")
        load["latency_polling"] = _loadavg()
        results["latency_polling"] = publish_latency.run(polling, polling_store, assets, plan.latency_swaps, "polling")
        stage(f"1/5 publish → served with polling only, each publish notified, {plan.latency_swaps} swaps")
        load["latency_polling_notified"] = _loadavg()
        notifier = CommitNotifier([polling.url])
        results["latency_polling_notified"] = publish_latency.run(
            polling, polling_store, assets, plan.latency_swaps, "polling, notified", notifier
        )
        notifier.close()
        polling.stop()
        stage(f"1/5 publish → served with events and the probe off (a third server), {plan.latency_swaps} swaps")
        probe_off, probe_off_store = plugin_server(
            assets, tmp, "probe-off", events=True, poll_s=EVENTS_POLL_S, extra_args=[], probe=False
        )
        with probe_off:
            load["latency_events_probe_off"] = _loadavg()
            results["latency_events_probe_off"] = publish_latency.run(
                probe_off, probe_off_store, assets, plan.latency_swaps, "events, probe off"
            )
        stage(f"1/5 {parallel_swaps.ADAPTERS} adapters published at once against one, {plan.parallel_rounds} rounds")
        load["parallel"] = _loadavg()
        results["parallel"] = parallel_swaps.run(events, events_store, assets, plan.parallel_rounds)
        stage(f"2/5 engine-loop stall, ours and native, {plan.stall_swaps} swaps per adapter shape")
        load["stall"] = _loadavg()
        results["stall"] = engine_stall.run(events, events_store, assets, plan.stall_swaps, plan.sticky_seconds)
        stage(
            f"3/5 serving: {serving.CLIENTS} streaming clients, {plan.serving_seconds:.0f} s with swaps every 2 s in {serving.BLOCK_S:.0f} s blocks between blocks without"
        )
        load["serving"] = _loadavg()
        results["serving"] = serving.run(events, events_store, assets, plan.serving_seconds)
        stage(f"4/5 memory over {plan.memory_swaps} swaps")
        load["memory"] = _loadavg()
        results["memory"] = memory.run(events, events_store, assets, plan.memory_swaps)
        stage(
            f"5/5 base-weight sync over gloo: {plan.pushes} pushes alternated with plain gloo broadcasts of the same bytes"
        )
        load["weight_sync"] = _loadavg()
        results["weight_sync"] = {
            **base_weights.run(events, assets, plan.pushes),
            "nccl": gpu_copy.NO_GPU if not _has_gpu() else NCCL_NOT_HERE,
        }
    stage(f"7 install stall against adapter size and --max-lora-rank {slot_stall.RANKS}, {plan.slot_swaps} swaps each")
    load["slot_stall"] = _loadavg()
    results["slot_stall"] = slot_stall.run(prepare(shapes=slot_stall.SIZES), tmp, plan.slot_swaps)
    stage("8 policy sync per RL step: ours on 2 and 1 engines against TRL's adapter and merged paths")
    load["policy_sync"] = _loadavg()
    policy_sync.run(options.out, quick=options.quick)
    stage(
        "9 Ray fleet on a simulated two-node cluster: replica restart, publish → served across nodes with and without notices"
    )
    load["ray_fleet"] = _loadavg()
    results["ray_fleet"] = ray_fleet.main(
        ["--swaps", "3" if options.quick else "20", "--out", str(options.out / "ray_fleet.json")]
    )
    stage("GPU: pinned vs pageable host-to-device copies")
    results["gpu_copy"] = gpu_copy.measure({label: assets.adapter_bytes(label) for label in assets.adapters})

    results["load_average"] = load
    results["wall_seconds"] = time.time() - began
    report.write(results, options.out)
    shutil.rmtree(tmp, ignore_errors=True)
    stage(f"done in {results['wall_seconds'] / 60:.1f} min: {options.out}/results.md")
    for row in results["targets"]:
        print(f"  {'met   ' if row['met'] else 'MISSED'} {row['name']}: {row['summary']}")


def _loadavg() -> list[float]:
    import os

    return list(os.getloadavg())


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
