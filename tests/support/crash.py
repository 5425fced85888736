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


def _publish(root: str, src: str, ready: Any, go: Any) -> None:
    from vllm_lora_hotswap.store import validate_checkpoint_dir

    validate_checkpoint_dir(Path(src))  # warm up (imports, page cache) before the clock starts
    store = CheckpointStore(root)
    ready.set()
    go.wait()
    store.publish("lora1", src)


def kill_publishes(store: CheckpointStore, src: Path, trials: int, seed: int = 0) -> list[float]:
    """Start ``trials`` publishers of ``src`` one after another and SIGKILL each at a
    random moment of its publish; returns the kill delays. Each child is started and
    warmed up first, so the delay is measured from the start of the publish itself."""
    context = multiprocessing.get_context("spawn")
    start = time.perf_counter()
    store.publish("lora1", src)  # measures how long one publish takes
    duration = time.perf_counter() - start
    rng = random.Random(seed)
    delays = []
    for _ in range(trials):
        ready, go = context.Event(), context.Event()
        process = context.Process(target=_publish, args=(str(store.root), str(src), ready, go))
        process.start()
        ready.wait(60)
        delay = rng.uniform(0, duration * 1.2)
        go.set()
        time.sleep(delay)
        os.kill(process.pid, signal.SIGKILL)
        process.join()
        delays.append(delay)
    return delays
