"""A store of 200 adapters × 50 versions plus one adapter with 10,000 versions under a
running engine: the poll stays O(adapters), an idle engine stays idle (no retries, a few
per cent of one core for the polls), and a new version is still served within the poll
interval. The polls' cost is asserted in CPU seconds, not as a decode rate: two decode
rates measured a minute apart on shared cores differ by more than the polls could cost."""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest

from hotswap_devkit.server import VllmServer
from tests.conftest import PROMPTS
from tests.support.fs_ops import FsOps
from vllm_lora_hotswap.store import CheckpointStore
from vllm_lora_hotswap.store.names import timestamp_name
from vllm_lora_hotswap.watcher import StoreWatcher

pytestmark = pytest.mark.engine

ADAPTERS = 200
VERSIONS = 50
DEEP_VERSIONS = 10_000
POLL_S = 0.5


@pytest.fixture(scope="module")
def scale_engine(
    toy_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[VllmServer, CheckpointStore]]:
    root = tmp_path_factory.mktemp("scale-store")
    log = tmp_path_factory.mktemp("logs") / "scale-engine.log"
    # Polling only: the poll is what must stay cheap.
    server = VllmServer(
        toy_model, root, log, env={"VLLM_HOTSWAP_EVENTS": "0", "VLLM_HOTSWAP_POLL_INTERVAL": str(POLL_S)}
    )
    yield server.start(), CheckpointStore(root)
    server.stop()


def _fill(store: CheckpointStore, adapter: str, template: Path, count: int, start: datetime) -> None:
    """``count`` READY versions of ``adapter`` older than any real publish: hard links to
    ``template``'s files (the same bytes, so every version validates)."""
    adapter_dir = store.adapter_dir(adapter)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    files = sorted(template.iterdir())
    for i in range(count):
        version = adapter_dir / timestamp_name(start + timedelta(seconds=i))
        version.mkdir()
        for file in files:
            os.link(file, version / file.name)
    (adapter_dir / "LATEST").write_text(version.name)


def _cpu_seconds(engine: VllmServer) -> float:
    """CPU seconds used so far by the engine's processes (API server, engine core, worker)."""
    total = 0.0
    for process in engine.processes():
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def test_200_adapters_and_10000_versions(scale_engine, make_lora, reference, monkeypatch: pytest.MonkeyPatch) -> None:
    engine, store = scale_engine
    lora_v1, lora_v2 = make_lora(141), make_lora(142)
    first = store.publish("deep", lora_v1)
    engine.wait_served("deep", first)
    engine.complete("deep", PROMPTS[0], max_tokens=4)  # warm

    template = store.version_dir("deep", first)
    old = datetime(2020, 1, 1, tzinfo=UTC)
    _fill(store, "deep", template, DEEP_VERSIONS, old)
    (store.adapter_dir("deep") / "LATEST").write_text(first)
    for i in range(ADAPTERS):
        _fill(store, f"scale-{i:03d}", template, VERSIONS, old)

    def settled() -> bool:
        # An adapter is listed as soon as it is seen, in state "waiting" until its first
        # transaction starts: only a recorded swap says that transaction has ended.
        adapters = engine.adapters().values()
        return len(adapters) == ADAPTERS + 1 and all(a["last_swap"] and a["state"] != "swapping" for a in adapters)

    engine.wait_until(settled, 120, "every adapter to be seen and its first transaction to end")
    adapters = engine.adapters()
    states = Counter(a["state"] for a in adapters.values())
    # 8 host slots (--max-cpu-loras): the rest wait for one, and say so.
    unexpected = {
        name: (a["state"], a["last_error"]) for name, a in adapters.items() if a["state"] not in ("serving", "no-slot")
    }
    assert states == {"serving": 8, "no-slot": ADAPTERS + 1 - 8}, (states, unexpected)
    assert engine.adapters()["deep"]["served_version"] == first

    # Idle with 10,200 versions in the store: every poll finds nothing new, no adapter waiting
    # for a slot is tried again, and the polls cost a few per cent of one core (a quarter of
    # one is the bound: CPU seconds, which a busy neighbour on the machine barely changes).
    swaps = {name: a["last_swap"] for name, a in engine.adapters().items()}
    cpu, start = _cpu_seconds(engine), time.monotonic()
    time.sleep(10 * POLL_S)
    share = (_cpu_seconds(engine) - cpu) / (time.monotonic() - start)
    print(f"idle engine with {ADAPTERS + 1} adapters: {share:.1%} of one core")
    assert {name: a["last_swap"] for name, a in engine.adapters().items()} == swaps
    assert share < 0.25, f"the idle engine used {share:.0%} of one core"

    second = store.publish("deep", lora_v2)
    engine.wait_served("deep", second, timeout=30)
    assert engine.tokens("deep", PROMPTS[0]) == (f"deep@{second}", reference(lora_v2, PROMPTS[0]))

    # The poll itself: a listing of the root and three small reads per adapter, however many versions.
    watcher = StoreWatcher(store, lambda _: True, poll_interval=POLL_S, events=False)
    watcher.poll()
    ops = FsOps(monkeypatch)
    counts = ops.measure(watcher.poll)
    assert counts.total() - counts["lstat"] == 2 + 3 * (ADAPTERS + 1), counts
