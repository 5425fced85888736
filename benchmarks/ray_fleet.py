"""The Ray fleet on a simulated two-node Ray cluster (loopback only): restart time and
publish → served on both nodes.

    python -m benchmarks.ray_fleet [--swaps 5]      # needs the [ray] extra; also run by make bench

Two fleets of two CPU replicas of the tests' toy model, one per node, one after the other:

* ``events``: inotify + 5 s poll, no notice: the single-machine events path (the baseline);
  then one replica's process is killed: kill → healthy again (Ray's restart and the engine's
  start-up) and kill → serving the current version.
* ``cross-node``: events off and a 1 s poll, as on a store without cross-node events
  (NFS, CPFS): publish without notices, then publish followed by the publisher's notice
  (``CommitNotifier`` to the fleet's live URLs).

Publish → served is from the commit (READY's mtime) to the later of the two replicas'
``updated`` events. Writes ``benchmarks/results/ray_fleet.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from hotswap_devkit.toy_models import make_adapter, make_model
from vllm_lora_hotswap.notify import CommitNotifier
from vllm_lora_hotswap.store import CheckpointStore

RESULTS = Path(__file__).resolve().parent / "results"
BASE_ARGS = [
    "--enable-lora",
    "--max-lora-rank",
    "16",
    "--max-loras",
    "2",
    "--max-cpu-loras",
    "8",
    "--dtype",
    "float32",
    "--max-model-len",
    "256",
    "--enforce-eager",
    "--max-num-seqs",
    "16",
]
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOTSWAP_RETIRE_GRACE": "1"}


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    """``predicate()``'s first true value, polled every 50 ms; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.05)
    raise TimeoutError(f"{what} within {timeout}s")


def _updated_at(url: str, adapter: str, version: str) -> float | None:
    events = httpx.get(f"{url}/v1/lora/events", timeout=10).json()["events"]
    times = [e["at"] for e in events if e["kind"] == "updated" and e["adapter"] == adapter and e["version"] == version]
    return min(times) if times else None


def publish_to_served(
    fleet: Any, store: CheckpointStore, adapters: list[Path], notifier: CommitNotifier | None
) -> list[float]:
    """Seconds from each commit to the later replica's ``updated`` event."""
    seconds = []
    for adapter_dir in adapters:
        version = store.publish("policy", adapter_dir)
        committed = (store.version_dir("policy", version) / "READY").stat().st_mtime
        if notifier is not None:
            notifier.add(fleet.urls())
            notifier.notify("policy", version)
        urls = fleet.urls()
        served = wait_for(
            lambda version=version, urls=urls: all(_updated_at(u, "policy", version) for u in urls) and urls,
            30,
            "both replicas serve it",
        )
        seconds.append(max(_updated_at(u, "policy", version) or 0.0 for u in served) - committed)
        time.sleep(1.5)  # a quiet gap between publications
    return seconds


def restart(fleet: Any, store: CheckpointStore) -> dict[str, float]:
    victim = fleet.replicas()[0]
    version = store.active_version("policy")
    killed = time.monotonic()
    os.killpg(victim.pid, signal.SIGKILL)
    back = wait_for(lambda: (r := fleet.replicas()[0]).healthy and r.pid != victim.pid and r, 600, "replica back")
    healthy = time.monotonic() - killed
    wait_for(
        lambda: (
            httpx.get(f"{back.url}/v1/lora/adapters", timeout=5)
            .json()["adapters"]
            .get("policy", {})
            .get("served_version")
            == version
        ),
        120,
        "restarted replica serves the version",
    )
    return {
        "kill_to_healthy_s": healthy,
        "kill_to_serving_s": time.monotonic() - killed,
        "moved_node": back.node_id != victim.node_id,
    }


def run_fleet(model: Path, store: CheckpointStore, env: dict[str, str], log_dir: Path) -> Any:
    from vllm_lora_hotswap.fleet.ray_fleet import RayFleet

    fleet = RayFleet(
        str(model),
        replicas=2,
        root=str(store.root),
        host="127.0.0.1",
        vllm_args=BASE_ARGS,
        env={**ENV, **env},
        log_dir=str(log_dir),
    ).start()
    if not fleet.wait_healthy(600):
        fleet.stop()
        raise RuntimeError(f"the fleet did not start: {fleet.replicas()}; logs in {log_dir}")
    return fleet


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "ray_fleet.json")
    args = parser.parse_args(argv)

    import ray

    from vllm_lora_hotswap.fleet.ray_fleet import loopback_cluster

    tmp = Path(tempfile.mkdtemp(prefix="ray-fleet-bench-"))
    model = make_model(tmp / "tiny-llama")
    adapters = [make_adapter(model, tmp / f"adapter{i}", i, 8, ("q_proj", "v_proj")) for i in range(1, 4)]
    picks = [adapters[i % len(adapters)] for i in range(args.swaps)]
    cluster = loopback_cluster()
    results: dict[str, Any] = {"replicas": 2, "nodes": 2, "swaps": args.swaps, "model": "toy (tests)"}
    try:
        store = CheckpointStore(tmp / "store-events")
        fleet = run_fleet(model, store, {"VLLM_HOTSWAP_POLL_INTERVAL": "5"}, tmp / "logs-events")
        try:
            results["events_publish_to_served_s"] = publish_to_served(fleet, store, picks, None)
            results["restart"] = restart(fleet, store)
        finally:
            fleet.stop()
        store = CheckpointStore(tmp / "store-cross-node")
        env = {"VLLM_HOTSWAP_EVENTS": "0", "VLLM_HOTSWAP_POLL_INTERVAL": "1"}
        fleet = run_fleet(model, store, env, tmp / "logs-cross-node")
        notifier = CommitNotifier()
        try:
            results["cross_node_poll_s"] = 1.0
            results["cross_node_without_notices_s"] = publish_to_served(fleet, store, picks, None)
            results["cross_node_with_notices_s"] = publish_to_served(fleet, store, picks, notifier)
        finally:
            notifier.close()
            fleet.stop()
    finally:
        ray.shutdown()
        cluster.shutdown()
    for key in ("events_publish_to_served_s", "cross_node_without_notices_s", "cross_node_with_notices_s"):
        results[key.removesuffix("_s") + "_p50_s"] = statistics.median(results[key])
    results["notices_over_events"] = (
        results["cross_node_with_notices_p50_s"] / results["events_publish_to_served_p50_s"]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
