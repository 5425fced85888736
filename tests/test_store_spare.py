"""Spare staging directories (``CheckpointStore.prepare_next``): the next version's weight file
is written over a file of zeros made ahead, and anything unusual falls back to a new file."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake import write_lora
from vllm_lora_hotswap.store import CheckpointStore
from vllm_lora_hotswap.store import spare as spare_module
from vllm_lora_hotswap.store.safetensors_layout import TensorBytes
from vllm_lora_hotswap.store.spare import HELPER

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def lora(tmp_path: Path) -> Path:
    return write_lora(tmp_path / "src", rank=16, hidden=512, layers=8)  # over 1 MiB: a writer thread


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "store")


def _tensors(lora: Path) -> dict[str, TensorBytes]:
    from safetensors.torch import load_file

    return {k: TensorBytes("F32", tuple(t.shape), t.numpy()) for k, t in load_file(lora / WEIGHTS).items()}


def _publish(store: CheckpointStore, lora: Path) -> Any:
    with store.open_version("lora1") as staged:
        staged.write_weights(_tensors(lora), {"format": "pt"})
        (staged.path / "adapter_config.json").write_bytes((lora / "adapter_config.json").read_bytes())
    return staged


def _wait_for_spare(store: CheckpointStore, adapter: str = "lora1") -> Path:
    directory = store.spare_directory(adapter)
    assert directory is not None, "no spare was asked for"
    deadline = time.monotonic() + 120  # at idle priority: only when a core is free
    while not store.spare_ready(adapter):
        assert time.monotonic() < deadline, "the helper never wrote the spare"
        time.sleep(0.01)
    return directory


def test_the_next_weight_file_is_written_over_the_spare_and_the_version_is_the_same(
    store: CheckpointStore, lora: Path
) -> None:
    first = _publish(store, lora)
    size = first.weights_digest.size
    assert store.prepare_next("lora1", size)
    assert not store.prepare_next("lora1", size)  # one per adapter
    directory = _wait_for_spare(store)
    assert HELPER.pid is not None and HELPER.pid != os.getpid()
    assert os.sched_getscheduler(HELPER.pid) == os.SCHED_IDLE  # on a core nothing else wants
    spare_inode = os.stat(directory / spare_module.SPARE_FILE).st_ino
    second = _publish(store, lora)
    assert second.path == directory
    committed = store.version_dir("lora1", second.version)
    assert os.stat(committed / WEIGHTS).st_ino == spare_inode  # written over it, not a new file
    assert (committed / WEIGHTS).read_bytes() == (store.version_dir("lora1", first.version) / WEIGHTS).read_bytes()
    assert sorted(os.listdir(committed)) == ["READY", "adapter_config.json", WEIGHTS, "metadata.json"]
    store.validate("lora1", second.version)  # READY's sha256 is the file's
    assert not list((store.adapter_dir("lora1") / ".staging").iterdir())


def test_a_spare_of_another_size_not_finished_or_removed_is_not_written_over(
    store: CheckpointStore, lora: Path
) -> None:
    size = _publish(store, lora).weights_digest.size
    staging = store.adapter_dir("lora1") / ".staging"

    # Another size (the adapter's rank changed): a new file; the spare's is dropped at the commit.
    store.prepare_next("lora1", size + 1)
    directory = _wait_for_spare(store)
    staged = _publish(store, lora)
    assert staged.path == directory and os.stat(store.version_dir("lora1", staged.version) / WEIGHTS).st_size == size
    assert spare_module.SPARE_FILE not in os.listdir(store.version_dir("lora1", staged.version))
    store.validate("lora1", staged.version)

    # Not finished: the version opens a staging directory of its own; the spare stays for the next.
    _publish(store, lora)  # the helper is running
    os.kill(HELPER.pid, signal.SIGSTOP)
    try:
        store.prepare_next("lora1", size)
        waiting = store.spare_directory("lora1")
        staged = _publish(store, lora)
        assert staged.path != waiting and store.spare_directory("lora1") == waiting
    finally:
        os.kill(HELPER.pid, signal.SIGCONT)
    assert _wait_for_spare(store) == waiting and _publish(store, lora).path == waiting

    # Removed by a gc with a short grace before it is taken: the version starts afresh.
    store.prepare_next("lora1", size)
    directory = _wait_for_spare(store)
    store.gc(grace=0)
    assert not directory.exists()
    staged = _publish(store, lora)
    assert staged.path != directory
    store.validate("lora1", staged.version)
    assert not list(staging.iterdir())


def test_a_spare_unused_by_the_writer_is_dropped_and_spares_go_at_exit(store: CheckpointStore, lora: Path) -> None:
    size = _publish(store, lora).weights_digest.size
    store.prepare_next("lora1", size)
    directory = _wait_for_spare(store)
    with store.open_version("lora1") as staged:  # saved by other means (PEFT's save_pretrained)
        for name in ("adapter_config.json", WEIGHTS):
            (staged.path / name).write_bytes((lora / name).read_bytes())
    assert staged.path == directory
    assert sorted(os.listdir(store.version_dir("lora1", staged.version))) == [
        "READY",
        "adapter_config.json",
        WEIGHTS,
        "metadata.json",
    ]
    store.prepare_next("lora1", size)
    left = _wait_for_spare(store)
    spare_module._discard_all()  # what atexit runs
    assert not left.exists() and store.spare_directory("lora1") is None
