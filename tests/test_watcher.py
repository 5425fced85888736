"""Change detection: polling cost is O(adapters), whatever the number of retained versions."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.fake import write_lora
from tests.support.fs_ops import FsOps
from vllm_lora_hotswap.store import CheckpointStore
from vllm_lora_hotswap.watcher import StoreWatcher


@pytest.fixture
def lora(tmp_path: Path) -> Path:
    return write_lora(tmp_path / "src", hidden=32, layers=1)


def test_poll_cost_does_not_grow_with_retained_versions(
    tmp_path: Path, lora: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = CheckpointStore(tmp_path / "store")
    adapters = [f"lora{i}" for i in range(20)]
    for adapter in adapters:
        store.publish(adapter, lora)
    watcher = StoreWatcher(store, lambda _: True, poll_interval=5.0, events=False)
    assert watcher.poll() == set(adapters)
    ops = FsOps(monkeypatch)
    few = ops.measure(watcher.poll)
    start = time.perf_counter()
    for _ in range(20):
        watcher.poll()
    few_seconds = (time.perf_counter() - start) / 20

    monkeypatch.undo()  # create 10,000 retained versions of one adapter, uncounted
    heavy = store.adapter_dir("lora0")
    for i in range(10_000):
        (heavy / f"2020-01-01T00-00-00Z-{i:04d}").mkdir()
    assert watcher.poll() == {"lora0"}  # the directory changed once
    ops = FsOps(monkeypatch)
    many = ops.measure(watcher.poll)
    start = time.perf_counter()
    for _ in range(20):
        watcher.poll()
    many_seconds = (time.perf_counter() - start) / 20

    # the root: a stat and a listing; each adapter: LATEST and ACTIVE read, its directory stat-ed,
    # and the lstat calls of resolving its path against the root's (symlinks must not leave the store)
    assert many == few, (few, many)
    lstats, named = few["lstat"], few.total() - few["lstat"]
    assert named == 2 + 3 * len(adapters), few
    assert lstats % len(adapters) == 0, few  # so many per adapter, none per version
    with capsys.disabled():
        print(
            f"\npoll of 20 adapters: {few.total()} fs calls ({named} stat/open/scandir, {lstats} lstat), "
            f"{1e3 * few_seconds:.2f} ms; with 10,000 retained versions: {many.total()} fs calls, {1e3 * many_seconds:.2f} ms"
        )


def test_poll_sees_new_changed_pinned_and_vanished_adapters(tmp_path: Path, lora: Path) -> None:
    store = CheckpointStore(tmp_path / "store")
    v1 = store.publish("a", lora)
    watcher = StoreWatcher(store, lambda name: name != "ignored", poll_interval=5.0, events=False)
    assert watcher.poll() == {"a"}
    assert watcher.poll() == set()
    store.publish("b", lora)
    store.publish("ignored", lora)
    assert watcher.poll() == {"b"}
    store.pin("a", v1)
    assert watcher.poll() == {"a"}
    os.rename(store.adapter_dir("b"), tmp_path / "b-moved")
    assert watcher.poll() == {"b"}
    watcher.invalidate("a")
    assert watcher.poll() == {"a"}


@contextmanager
def _event_loop(store: CheckpointStore) -> Iterator[StoreWatcher]:
    """A watcher of ``store`` whose poll (60 s) never comes in a test, its event loop running."""
    watcher = StoreWatcher(store, lambda _: True, poll_interval=60.0, events=True)
    watcher.poll()
    stop = threading.Event()
    watcher.start_events(stop)
    try:
        yield watcher
    finally:
        stop.set()


def _hinted_within(watcher: StoreWatcher, adapter: str, action: threading.Timer) -> bool:
    """Whether ``action`` (started here) makes the event loop hint ``adapter`` within 10 s."""
    time.sleep(0.5)  # the inotify watch is set up
    watcher.wait(0)  # its set-up hints every watched adapter once (a commit may have raced the watch)
    action.start()
    hinted: set[str] = set()
    deadline = time.monotonic() + 10
    while adapter not in hinted and time.monotonic() < deadline:
        hinted |= watcher.wait(deadline - time.monotonic())
    return adapter in hinted


def test_file_system_events_wake_the_watcher_before_the_poll(tmp_path: Path, lora: Path) -> None:
    store = CheckpointStore(tmp_path / "store")
    store.publish("a", lora)
    with _event_loop(store) as watcher:
        assert _hinted_within(watcher, "a", threading.Timer(0.2, store.publish, args=("a", lora)))
        assert watcher.poll({"a"}) == {"a"}


def test_another_engines_failure_record_wakes_the_watcher_before_the_poll(tmp_path: Path, lora: Path) -> None:
    store = CheckpointStore(tmp_path / "store")
    version = store.publish("a", lora)
    with _event_loop(store) as watcher:
        mark = threading.Timer(
            0.2, store.record_failure, args=("a", version, "engine-b", "stage", "checksum mismatch")
        )
        assert _hinted_within(watcher, "a", mark)  # the adapter directory's touch, long before the 60 s poll
        assert [r.instance_id for r in store.failures("a", version)] == ["engine-b"]


def test_inotify_waits_on_descriptors_above_1024(tmp_path: Path) -> None:
    """select() cannot wait on a descriptor numbered 1,024 or more; a busy engine process can
    have that many open before the watcher starts."""
    from vllm_lora_hotswap import inotify

    if not inotify.available():
        pytest.skip("no inotify here")
    import resource

    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 1200:
        pytest.skip("the descriptor limit is below 1,200")
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with inotify.Inotify() as watch:
            assert watch.fd >= 1024
            watch.add(tmp_path)
            (tmp_path / "new").write_bytes(b"")
            events = watch.read(5.0)
            assert [e.name for e in events][:1] == ["new"]
            watch.interrupt()
            assert watch.read(5.0) == []  # woken by the pipe, nothing queued
    finally:
        for fd in held:
            os.close(fd)
