"""Kill publishers with SIGKILL at random points of a publish."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

from vllm_lora_hotswap.store import CheckpointStore


def _publish(root: str, src: str, ready: Any, go: Any, duration: Any) -> None:
    store = CheckpointStore(root)
    ready.set()
    go.wait()
    start = time.perf_counter()
    store.publish("lora1", src)
    duration.value = time.perf_counter() - start


def kill_publishes(store: CheckpointStore, src: Path, trials: int, seed: int = 0) -> list[float]:
    """Start ``trials`` publishers of ``src`` one after another and SIGKILL each at a
    random moment of its publish; returns the kill delays.

    Children come from a fork server that imported the store (and torch) once, so
    each starts at once; a first, uninterrupted publish measures how long one takes
    under the same conditions, and each delay is drawn over that span.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["vllm_lora_hotswap.store", "torch", "safetensors.torch"])

    def start() -> tuple[Any, Any, Any]:
        ready, go, duration = context.Event(), context.Event(), context.Value("d", 0.0)
        process = context.Process(target=_publish, args=(str(store.root), str(src), ready, go, duration))
        process.start()
        ready.wait(60)
        return process, go, duration

    process, go, duration = start()
    go.set()
    process.join()
    rng = random.Random(seed)
    delays = []
    for _ in range(trials):
        process, go, _ = start()
        delay = rng.uniform(0, duration.value * 1.2)
        go.set()
        time.sleep(delay)
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the publish finished first
        process.join()
        delays.append(delay)
    return delays
