"""The Ray fleet on a simulated two-node Ray cluster (loopback only): restart time and
publish → served on both nodes.

    python -m benchmarks.ray_fleet [--swaps 20]      # needs the [ray] extra; also run by make bench

Two fleets of two CPU replicas of the benchmark Llama (the model, adapter shape and serving
arguments of the single-machine publish → served benchmark), one per node, one after the other;
each first serves one untimed publication (the adapter's first load):

* ``events``: inotify + 5 s poll, no notice: the single-machine events path (the baseline);
  then one replica's process is killed: kill → healthy again (Ray's restart and the engine's
  start-up) and kill → serving the current version.
* ``cross-node``: events off and a 1 s poll, as on a store without cross-node events
  (NFS, CPFS): publications without a notice and with the publisher's notice
  (``CommitNotifier`` to the fleet's live URLs), alternated.

Publish → served is from the commit (READY's mtime) to the later of the two replicas'
``updated`` events. Targets: with notices, within 1.3 × the events path; without, within the
poll interval + the events path. Writes ``benchmarks/results/ray_fleet.json`` and ``ray_fleet.md``.
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

from hotswap_devkit.server import own_core_env, wait_for
from vllm_lora_hotswap.notify import WAIT_PATH, CommitNotifier
from vllm_lora_hotswap.store import CheckpointStore

from .assets import prepare
from .common import SERVER_ARGS
from .publish_latency import ADAPTER_SHAPE, PHASES

RESULTS = Path(__file__).resolve().parent / "results"
# The single-machine publish → served benchmark's model, adapter shape, serving arguments and
# retire grace (benchmarks.publish_latency), so that the events path here is the same figure's.
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOTSWAP_RETIRE_GRACE": "0.25"}


def _updated(url: str, adapter: str, version: str) -> dict[str, Any] | None:
    """The replica's ``updated`` event for ``adapter@version`` (its time and phase timings)."""
    events = httpx.get(f"{url}/v1/lora/events", timeout=10).json()["events"]
    found = [e for e in events if e["kind"] == "updated" and e["adapter"] == adapter and e["version"] == version]
    return min(found, key=lambda e: e["at"]) if found else None


def publish_to_served(
    fleet: Any, store: CheckpointStore, adapter_dir: Path, notifier: CommitNotifier | None
) -> tuple[float, dict[str, float]]:
    """Seconds from one commit to the later replica's ``updated`` event, and that replica's
    phase timings (``detect``: commit → its pipeline starts reading). The publisher knows the live replicas
    before it publishes (as ``FleetRollout`` and the scheduler do), so the notice leaves right
    after the commit."""
    if notifier is not None:
        notifier.add(fleet.urls())
    version = store.publish("policy", adapter_dir)
    if notifier is not None:
        notifier.notify("policy", version)
    committed = (store.version_dir("policy", version) / "READY").stat().st_mtime
    urls = fleet.urls()
    for url in urls:  # the engines' long-poll: no polling load from here while they swap
        params = {"adapter": "policy", "version": version, "timeout": 30}
        if not httpx.get(f"{url}{WAIT_PATH}", params=params, timeout=40).json()["reached"]:
            raise TimeoutError(f"{url} did not serve policy@{version} within 30 s")
    last = max((_updated(u, "policy", version) for u in urls), key=lambda e: e["at"] if e else 0.0)
    assert last is not None
    time.sleep(1.5)  # a quiet gap between publications
    return last["at"] - committed, last["timings"]


def series(
    fleet: Any, store: CheckpointStore, adapters: list[Path], notifier: CommitNotifier | None
) -> list[tuple[float, float]]:
    return [publish_to_served(fleet, store, adapter_dir, notifier) for adapter_dir in adapters]


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
        vllm_args=list(SERVER_ARGS),
        env={**ENV, **env},
        replica_env=own_core_env,  # the simulated nodes share this machine's cores
        log_dir=str(log_dir),
    ).start()
    if not fleet.wait_healthy(600):
        fleet.stop()
        raise RuntimeError(f"the fleet did not start: {fleet.replicas()}; logs in {log_dir}")
    return fleet


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "ray_fleet.json")
    args = parser.parse_args(argv)

    import ray

    from vllm_lora_hotswap.fleet.ray_fleet import loopback_cluster

    tmp = Path(tempfile.mkdtemp(prefix="ray-fleet-bench-"))
    assets = prepare()
    model = assets.model
    adapters = list(assets.adapters[ADAPTER_SHAPE])  # two seeds: every publication changes the weights
    picks = [adapters[i % len(adapters)] for i in range(args.swaps)]
    cluster = loopback_cluster()
    results: dict[str, Any] = {
        "replicas": 2,
        "nodes": 2,
        "swaps": args.swaps,
        "model": "benchmark Llama",
        "adapter": ADAPTER_SHAPE,
    }
    try:
        store = CheckpointStore(tmp / "store-events")
        fleet = run_fleet(model, store, {"VLLM_HOTSWAP_POLL_INTERVAL": "5"}, tmp / "logs-events")
        try:
            publish_to_served(fleet, store, adapters[-1], None)  # untimed: the adapter's first load
            served = series(fleet, store, picks, None)
            results["events_publish_to_served_s"] = [s for s, _ in served]
            results["events_phases"] = [t for _, t in served]
            results["events_detect_s"] = [t.get("detect", float("nan")) for _, t in served]
            results["restart"] = restart(fleet, store)
        finally:
            fleet.stop()
        store = CheckpointStore(tmp / "store-cross-node")
        env = {"VLLM_HOTSWAP_EVENTS": "0", "VLLM_HOTSWAP_POLL_INTERVAL": "1"}
        fleet = run_fleet(model, store, env, tmp / "logs-cross-node")
        notifier = CommitNotifier()
        try:
            results["cross_node_poll_s"] = 1.0
            publish_to_served(fleet, store, adapters[-1], notifier)  # untimed: the adapter's first load
            # Interleaved, so that both series see the same machine.
            pairs = [
                (publish_to_served(fleet, store, a, None), publish_to_served(fleet, store, a, notifier)) for a in picks
            ]
            results["cross_node_without_notices_s"] = [without[0] for without, _ in pairs]
            results["cross_node_with_notices_s"] = [notified[0] for _, notified in pairs]
            results["cross_node_without_notices_phases"] = [without[1] for without, _ in pairs]
            results["cross_node_with_notices_phases"] = [notified[1] for _, notified in pairs]
            results["cross_node_with_notices_detect_s"] = [
                t.get("detect", float("nan")) for t in results["cross_node_with_notices_phases"]
            ]
        finally:
            notifier.close()
            fleet.stop()
    finally:
        ray.shutdown()
        cluster.shutdown()
    for key in (
        "events_publish_to_served_s",
        "cross_node_without_notices_s",
        "cross_node_with_notices_s",
        "events_detect_s",
        "cross_node_with_notices_detect_s",
    ):
        results[key.removesuffix("_s") + "_p50_s"] = statistics.median(results[key])
    results["notices_over_events"] = (
        results["cross_node_with_notices_p50_s"] / results["events_publish_to_served_p50_s"]
    )
    results["targets"] = targets(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results))
    print(json.dumps(results, indent=2))
    return results


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The scale-out targets: publish → served across nodes with notices within 1.3 × the events
    path, and without notices within the poll interval + the events path (p50s)."""
    events = results["events_publish_to_served_p50_s"]
    notified = results["cross_node_with_notices_p50_s"]
    unnotified = results["cross_node_without_notices_p50_s"]
    poll = results["cross_node_poll_s"]
    rows = []
    count = len(results["cross_node_with_notices_s"])
    for name, measured, limit, rule in (
        ("with notices", notified, 1.3 * events, f"≤ 1.3 × events {_ms(events)} = {_ms(1.3 * events)}"),
        ("without notices", unnotified, poll + events, f"≤ {poll:.0f} s poll + events {_ms(events)}"),
    ):
        row = {
            "name": f"publish → served p50 on two Ray nodes, events off, {name}",
            "rule": rule,
            "measured": _ms(measured),
            "ratio": measured / limit,
            "met": measured <= limit,
            "note": f"{count} publications; [Ray fleet](ray_fleet.md)",
        }
        rows.append({**row, "summary": f"{row['measured']} ({rule}; ratio {row['ratio']:.2f})"})
    return rows


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f} ms"


def _phase_p50(results: dict[str, Any], key: str, phase: str) -> str:
    values = [t[phase] for t in results.get(key, []) if phase in t]
    return f"{1000 * statistics.median(values):.1f}" if values else "–"


def markdown(results: dict[str, Any]) -> str:
    restart = results["restart"]
    rows = [
        f"| {r['name']} | {r['rule']} | {r['measured']} | {r['ratio']:.2f} | {'met' if r['met'] else '**missed**'} |"
        for r in results["targets"]
    ]
    series = [  # label, publish → served key, phase timings key
        ("events (inotify), no notice", "events_publish_to_served_s", "events_phases"),
        ("events off, 1 s poll, no notice", "cross_node_without_notices_s", "cross_node_without_notices_phases"),
        (
            "events off, 1 s poll, the publisher's notice",
            "cross_node_with_notices_s",
            "cross_node_with_notices_phases",
        ),
    ]
    return "\n".join(
        [
            "# Ray fleet: two replicas on a simulated two-node cluster",
            "",
            f"`python -m benchmarks.ray_fleet` (part of `make bench`): {results['replicas']} CPU replicas of the "
            f"{results['model']} with adapter {results['adapter']} (as the single-machine publish → served benchmark), "
            "one per Ray node, every process on 127.0.0.1 and each replica's vLLM worker on a core of its "
            f"own; {results['swaps']} publications per series. Publish → served is from the commit to the later "
            'replica\'s `updated` event. "Events off" is a store on which a write raises no event on another node '
            "(NFS, CPFS).",
            "",
            "| target | rule | measured | ratio | result |",
            "|---|---|---|---|---|",
            *rows,
            "",
            "| series | p50 | max |",
            "|---|---|---|",
            *(
                f"| {label} | {_ms(statistics.median(results[key]))} | {_ms(max(results[key]))} |"
                for label, key, _ in series
            ),
            "",
            "Where the later replica's time goes (p50 of each phase, ms):",
            "",
            "| phase | " + " | ".join(label for label, _, _ in series) + " |",
            "|---|" + "---|" * len(series),
            *(
                f"| {phase} | " + " | ".join(_phase_p50(results, phases, phase) for _, _, phases in series) + " |"
                for phase in PHASES
            ),
            "",
            "Detect is from the commit until the later replica's pipeline starts reading the version; the "
            "other phases are the engines' own work, on cores shared with Ray and the driver.",
            "",
            "A replica's process killed (SIGKILL to its `vllm serve` process group): Ray restarts its actor "
            f"{'on another node' if restart['moved_node'] else 'on the same node'}; "
            f"back and healthy after {restart['kill_to_healthy_s']:.1f} s, serving the current version after "
            f"{restart['kill_to_serving_s']:.1f} s (an engine start on a CPU core shared with Ray and the benchmark driver).",
            "",
        ]
    )


if __name__ == "__main__":
    main()
