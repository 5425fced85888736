"""Kill publishers with SIGKILL at random points of a publish, or before each step of a publish in place."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from collections.abc import Iterator
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


# File-system calls a publish in place makes, in this module or the store's; a SIGKILL lands before one.
_STEP_CALLS = ("open", "mkdir", "write", "fsync", "fchmod", "rename", "replace", "unlink", "scandir")


def _publish_in_place(
    root: str,
    src: str,
    from_memory: bool,
    kill_at: int,
    ready: Any,
    go: Any,
    steps: Any,
    durable: bool = True,
    spare: bool = False,
) -> None:
    """Save ``src``'s checkpoint straight into a staged version and commit it: the weights from
    memory through ``write_weights`` (``from_memory``, as ``HotSwapCallback`` saves) or by
    safetensors' ``save_file`` into its directory, then a JSON config; SIGKILL this process just
    before its ``kill_at``-th file-system call (0: never; ``steps`` gets the count). ``durable``:
    the staged version's (False: no fsync at all). ``spare``: the version is opened over a
    spare staging directory made beforehand (``CheckpointStore.prepare_next``)."""
    import builtins
    import json

    from safetensors.torch import load_file, save_file

    from vllm_lora_hotswap.store.safetensors_layout import TensorBytes

    store = CheckpointStore(root)
    tensors = load_file(os.path.join(src, "adapter_model.safetensors"))
    config = json.loads(Path(src, "adapter_config.json").read_text())
    if spare:  # made (and its zeros written) before the calls are counted, as between two steps
        store.prepare_next("lora1", os.path.getsize(os.path.join(src, "adapter_model.safetensors")))
        made = store.spare_directory("lora1")
        while not store.spare_ready("lora1"):
            time.sleep(0.01)
    count = 0

    def counted(function: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal count
            count += 1
            if count == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)

        return call

    for name in _STEP_CALLS:
        setattr(os, name, counted(getattr(os, name)))
    builtins.open = counted(builtins.open)
    save_to = counted(save_file)  # one step: the Rust writer's own calls are not seen
    ready.set()
    go.wait()
    with store.open_version("lora1", {"kill_at": kill_at}, durable=durable) as staged:
        assert not spare or staged.path == made, "the version was not opened over the spare"
        if from_memory:  # its writes (in write_weights' thread) are counted one os.write at a time
            staged.write_weights(
                {k: TensorBytes("F32", tuple(t.shape), t.numpy()) for k, t in tensors.items()}, {"format": "pt"}
            )
        else:
            save_to(tensors, os.path.join(staged.path, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(staged.path, "adapter_config.json"), "w") as out:
            json.dump(config, out)
    steps.value = count


def kill_at_every_step(
    store: CheckpointStore, src: Path, *, from_memory: bool, durable: bool = True, spare: bool = False
) -> Iterator[tuple[int, int]]:
    """Publish ``src`` in place (:func:`_publish_in_place`, the weights ``from_memory`` or not,
    over a spare or not) twice, counting the second's file-system calls,
    then once more per call with a SIGKILL just before it: yields ``(step, steps)`` after each
    killed publish ended. Children come from a fork server, as in :func:`kill_publishes`."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["vllm_lora_hotswap.store", "torch", "safetensors.torch"])

    def run(kill_at: int) -> tuple[int, int]:
        ready, go, steps = context.Event(), context.Event(), context.Value("i", 0)
        process = context.Process(
            target=_publish_in_place,
            args=(str(store.root), str(src), from_memory, kill_at, ready, go, steps, durable, spare),
        )
        process.start()
        ready.wait(60)
        go.set()
        process.join(60)
        return process.exitcode, steps.value

    run(0)  # the first publish also creates the store's directories: more calls than the next ones
    exitcode, total = run(0)
    assert exitcode == 0 and total > 0, f"the uninterrupted publish in place failed (exit code {exitcode})"
    for kill_at in range(1, total + 1):
        exitcode, _ = run(kill_at)
        assert exitcode == -signal.SIGKILL, f"the publish killed at step {kill_at} ended with {exitcode}"
        yield kill_at, total
