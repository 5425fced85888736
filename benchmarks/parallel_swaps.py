"""Benchmark 6: eight adapters published at the same moment against one.

One round publishes one adapter alone and waits until it is served, then
publishes eight adapters at once (``CheckpointStore.publish_many``: every copy
first, then the eight commits together) and waits until all are served. Each
time runs from the first commit (READY's mtime) to the last switch (the
instance's own ``last_swap.finished_at``). Target: the eight are all served
within 2 × what one takes (p50 over the rounds), which holds only when their
swaps progress together instead of one after another. The clock starts at the
first of the eight commits; how far apart they landed is ``commit_spread``.

Part of ``make bench``; alone, on a server of its own:

    python -m benchmarks.parallel_swaps [--rounds N] [--no-probe]
"""

from __future__ import annotations

from typing import Any

from vllm_lora_hotswap.store import CheckpointStore

from .assets import Assets
from .common import EVENTS_POLL_S, Progress, Server, plugin_server, summary
from .publish_latency import ready_mtime

ADAPTERS = 8
ADAPTER_SHAPE = "r16-qv"
FACTOR = 2.0


def _publish_and_wait(server: Server, store: CheckpointStore, adapters: list[str], source: Any) -> tuple[float, float]:
    """(first commit → last switch, last commit − first commit)."""
    published = store.publish_many(dict.fromkeys(adapters, source))
    versions = [published[adapter] for adapter in adapters]
    commits = [ready_mtime(store, a, v) for a, v in zip(adapters, versions)]
    switched = [
        server.wait_swapped(a, v, retired=False)["last_swap"]["finished_at"] for a, v in zip(adapters, versions)
    ]
    return max(switched) - min(commits), max(commits) - min(commits)


def run(server: Server, store: CheckpointStore, assets: Assets, rounds: int) -> dict[str, Any]:
    sources = assets.adapters[ADAPTER_SHAPE]
    names = [f"parallel-{i}" for i in range(ADAPTERS)]
    _publish_and_wait(server, store, names, sources[0])  # warm-up: every adapter holds a version
    one, eight, spread = [], [], []
    progress = Progress("rounds", rounds)
    for index in range(rounds):
        source = sources[(index + 1) % len(sources)]
        one.append(_publish_and_wait(server, store, names[:1], source)[0])
        all_served, commit_spread = _publish_and_wait(server, store, names, source)
        eight.append(all_served)
        spread.append(commit_spread)
        progress.advance()
    for name in names:
        store.retire(name)
    return {
        "adapters": ADAPTERS,
        "adapter_shape": ADAPTER_SHAPE,
        "one": summary(one),
        "eight": summary(eight),
        "commit_spread": summary(spread),
        "one_s": one,
        "eight_s": eight,
    }


def target(result: dict[str, Any]) -> dict[str, Any]:
    """p50 of eight at once ≤ 2 × p50 of one."""
    limit = FACTOR * result["one"]["p50"]
    measured = result["eight"]["p50"]
    return {"measured_s": measured, "limit_s": limit, "ratio": measured / limit, "met": measured <= limit}


def main() -> None:
    import argparse
    import shutil
    import tempfile
    from pathlib import Path

    from .assets import prepare

    parser = argparse.ArgumentParser(prog="python -m benchmarks.parallel_swaps", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-probe", action="store_true", help="VLLM_HOTSWAP_PROBE=0 on the server")
    options = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="parallel-swaps-"))
    assets = prepare()
    server, store = plugin_server(assets, tmp, "parallel", events=True, poll_s=EVENTS_POLL_S, extra_args=[])
    if options.no_probe:
        server.env["VLLM_HOTSWAP_PROBE"] = "0"
    with server:
        result = run(server, store, assets, options.rounds)
    shutil.rmtree(tmp, ignore_errors=True)
    check = target(result)
    print(
        f"one publish p50 {1000 * result['one']['p50']:.0f} ms; {ADAPTERS} at once, all served p50 "
        f"{1000 * result['eight']['p50']:.0f} ms (commits spread over {1000 * result['commit_spread']['p50']:.0f} ms); "
        f"ratio to the 2x limit {check['ratio']:.2f} ({'met' if check['met'] else 'missed'})"
    )


if __name__ == "__main__":
    main()
