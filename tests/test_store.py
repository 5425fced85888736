"""The checkpoint store on real files: publish, ordering, crashes, validation, pins, gc."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.support.crash import kill_at_every_step, kill_publishes
from tests.support.fake import write_lora
from vllm_lora_hotswap.store import (
    AdapterServing,
    CheckpointStore,
    InstanceRecord,
    InvalidCheckpointError,
    InvalidNameError,
    NotFoundError,
    PartialPublishError,
    StoreError,
    StoreUnavailableError,
    UnsafePathError,
)
from vllm_lora_hotswap.store.checkpoint import FileDigest, parse_ready
from vllm_lora_hotswap.store.safetensors_layout import TensorBytes
from vllm_lora_hotswap.store.staged import _WRITE_IN_THREAD_BYTES


@pytest.fixture
def lora(tmp_path: Path) -> Path:
    return write_lora(tmp_path / "src")


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "store")


def fixed_clock(*moments: datetime):
    values = iter(moments)
    return lambda: next(values)


def test_publish_commits_a_complete_version(store: CheckpointStore, lora: Path) -> None:
    version = store.publish("lora1", lora, {"reward": 0.85, "training_step": 100})
    directory = store.version_dir("lora1", version)
    assert sorted(os.listdir(directory)) == [
        "READY",
        "adapter_config.json",
        "adapter_model.safetensors",
        "metadata.json",
    ]
    ready = json.loads((directory / "READY").read_text())
    assert set(ready["files"]) == {"adapter_config.json", "adapter_model.safetensors", "metadata.json"}
    metadata = json.loads((directory / "metadata.json").read_text())
    assert metadata["reward"] == 0.85 and metadata["version"] == version and metadata["adapter"] == "lora1"
    assert metadata["lora"] == {
        "r": 8,
        "lora_alpha": 16.0,
        "target_modules": ["q_proj", "v_proj"],
        "base_model": "tiny-llama",
    }
    assert metadata["source"] == str(lora.resolve()) and "created_at" in metadata
    assert store.versions("lora1") == [version] and store.active_version("lora1") == version
    assert (store.adapter_dir("lora1") / "LATEST").read_text() == version
    info = store.validate("lora1", version)
    assert info.config.r == 8 and info.metadata["reward"] == 0.85


def test_same_second_publishes_get_ordered_distinct_names(tmp_path: Path, lora: Path) -> None:
    second = datetime(2025, 8, 18, 10, 0, 0, tzinfo=UTC)
    store = CheckpointStore(tmp_path / "store", clock=fixed_clock(second, second, second))
    versions = [store.publish("lora1", lora) for _ in range(3)]
    assert versions == ["2025-08-18T10-00-00Z", "2025-08-18T10-00-00Z-0001", "2025-08-18T10-00-00Z-0002"]
    assert store.versions("lora1") == versions


def test_clock_jumping_backwards_keeps_publication_order(tmp_path: Path, lora: Path) -> None:
    now = datetime(2025, 8, 18, 10, 0, 0, tzinfo=UTC)
    store = CheckpointStore(
        tmp_path / "store", clock=fixed_clock(now, now - timedelta(hours=1), now + timedelta(seconds=5))
    )
    first, second, third = (store.publish("lora1", lora) for _ in range(3))
    assert first < second < third
    assert store.active_version("lora1") == third


def _publish_many(root: str, src: str, count: int, queue: multiprocessing.Queue) -> None:
    store = CheckpointStore(root)
    queue.put([store.publish("lora1", src, {"pid": os.getpid()}) for _ in range(count)])


def test_two_concurrent_publishers_of_one_adapter(store: CheckpointStore, lora: Path) -> None:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_publish_many, args=(str(store.root), str(lora), 8, queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(30)
    versions = store.versions("lora1")
    assert sorted(results[0] + results[1]) == versions and len(set(versions)) == 16
    for published in results:
        assert published == sorted(published)
    # Names sort in commit order: READY is written inside the commit's lock.
    commit_order = sorted(versions, key=lambda v: (store.version_dir("lora1", v) / "READY").stat().st_mtime_ns)
    assert commit_order == versions
    for version in versions:
        store.validate("lora1", version)


def test_publish_many_commits_every_adapter_together(store: CheckpointStore, lora: Path, tmp_path: Path) -> None:
    store.publish("a", lora)
    versions = store.publish_many({name: lora for name in ("a", "b", "c")}, metadata={"step": 7})
    assert sorted(versions) == ["a", "b", "c"]
    for adapter, version in versions.items():
        assert store.active_version(adapter) == version
        store.validate(adapter, version)
        assert json.loads((store.version_dir(adapter, version) / "metadata.json").read_text())["step"] == 7
    ready = [(store.version_dir(a, v) / "READY").stat().st_mtime for a, v in versions.items()]
    assert max(ready) - min(ready) < 1.0  # the copies came first; the commits land together

    (tmp_path / "missing").mkdir()
    with pytest.raises(PartialPublishError) as raised:  # bad sources: the others are published all the same
        store.publish_many({"d": lora, "e": tmp_path / "missing", "f": tmp_path / "absent"})
    assert raised.value.published == {"d": store.active_version("d")}
    assert isinstance(raised.value.errors["e"], InvalidCheckpointError) and isinstance(
        raised.value.errors["f"], NotFoundError
    )
    assert str(raised.value).startswith(
        f"published 1 of 3 adapters (d@{store.active_version('d')}); not published: e: "
    )
    assert "f: NotFoundError: source" in str(raised.value)
    assert not store.adapter_dir("e").joinpath("LATEST").exists()


def test_publisher_killed_at_random_points_never_leaves_a_partial_ready_version(
    store: CheckpointStore, tmp_path: Path
) -> None:
    """100 publishers SIGKILLed at random moments while a reader validates every
    READY version it sees; gc then removes what the killed ones left behind."""
    source = write_lora(tmp_path / "big", rank=16, hidden=2048, layers=8)  # ~4 MB: a copy worth interrupting
    seen: set[str] = set()
    partial: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            for version in store.versions("lora1"):
                try:
                    store.validate("lora1", version)
                    seen.add(version)
                except InvalidCheckpointError as exc:
                    partial.append(f"{version}: {exc}")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        delays = kill_publishes(store, source, trials=100)
    finally:
        stop.set()
        thread.join()
    assert not partial
    staging = store.adapter_dir("lora1") / ".staging"
    assert any(staging.iterdir()), f"no kill landed during a copy: {delays}"
    assert len(store.versions("lora1")) < 101, "no kill landed before a commit"
    assert seen, "the reader never saw a READY version"
    for version in store.versions("lora1"):
        store.validate("lora1", version)
    report = store.gc(grace=0)
    assert report.abandoned and not list(staging.iterdir())


@pytest.mark.parametrize(
    ("from_memory", "durable", "spare"),
    [(True, True, False), (False, True, False), (True, False, False), (True, True, True)],
    ids=["write_weights", "save_file", "write_weights-not-durable", "write_weights-over-a-spare"],
)
def test_publisher_in_place_killed_before_each_step_never_leaves_a_torn_or_half_visible_version(
    store: CheckpointStore, tmp_path: Path, from_memory: bool, durable: bool, spare: bool
) -> None:
    """A publish straight into the store (``open_version``; the weights through ``write_weights``
    as ``HotSwapCallback`` saves them, also over a spare staging directory as it does from its
    second step on, or saved into the staging directory; with every fsync or,
    ``durable=False``, none) SIGKILLed just before each of its file-system calls in turn: after
    each kill every version directory is a whole READY version, LATEST names one, and the only
    leftovers are in ``.staging``, which gc removes."""
    source = write_lora(tmp_path / "src", rank=16, hidden=512, layers=8)
    assert (source / "adapter_model.safetensors").stat().st_size > _WRITE_IN_THREAD_BYTES  # written by a thread
    adapter_dir = store.adapter_dir("lora1")
    committed = []  # per kill: whether its version was committed before it
    kills = kill_at_every_step(store, source, from_memory=from_memory, durable=durable, spare=spare)
    for step, steps in kills:  # noqa: B007 - steps is read after the loop
        names = sorted(p.name for p in adapter_dir.iterdir() if not p.name.startswith(".") and p.is_dir())
        assert names == store.versions("lora1"), f"killed before step {step}: a version directory without READY"
        for version in names:
            store.validate("lora1", version)  # every file whole, hashes as READY records
        latest = (adapter_dir / "LATEST").read_text()
        assert latest in names, f"killed before step {step}: LATEST names {latest!r}"
        committed.append(store.read_metadata("lora1", names[-1])["kill_at"] == step)
    assert steps > 10 and len(committed) == steps
    assert not committed[0] and committed[-1]  # kills landed before and after the commit
    staging = adapter_dir / ".staging"
    assert any(staging.iterdir()), "no kill left a partial write"
    store.gc(grace=0)
    assert not list(staging.iterdir())


def test_a_version_published_without_durability_makes_no_fsync_and_is_the_same_version(
    store: CheckpointStore, lora: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    tensors = load_file(lora / "adapter_model.safetensors")
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    for durable in (True, False):
        synced.clear()
        with store.open_version("lora1", durable=durable) as staged:
            staged.write_weights({k: TensorBytes("F32", tuple(t.shape), t.numpy()) for k, t in tensors.items()})
            (staged.path / "adapter_config.json").write_bytes((lora / "adapter_config.json").read_bytes())
        assert bool(synced) == durable, f"durable={durable}: {len(synced)} fsyncs"
        info = store.validate("lora1", staged.version)  # the same whole READY version either way
        assert store.active_version("lora1") == staged.version == info.version


def test_open_version_commits_on_a_clean_exit_and_publishes_nothing_on_an_exception(
    store: CheckpointStore, lora: Path
) -> None:
    with store.open_version("lora1", {"step": 1}) as staged:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            (staged.path / name).write_bytes((lora / name).read_bytes())
        (staged.path / "README.md").write_text("a model card: not part of a version")
    assert staged.version is not None and store.versions("lora1") == [staged.version]
    directory = store.version_dir("lora1", staged.version)
    assert sorted(os.listdir(directory)) == [
        "READY",
        "adapter_config.json",
        "adapter_model.safetensors",
        "metadata.json",
    ]
    info = store.validate("lora1", staged.version)
    assert info.metadata["step"] == 1 and info.metadata["source"] is None
    assert all(stat.S_IMODE(os.stat(directory / n).st_mode) == 0o644 for n in os.listdir(directory))

    with pytest.raises(RuntimeError, match="the save failed"):
        with store.open_version("lora1") as failed:
            (failed.path / "adapter_config.json").write_bytes((lora / "adapter_config.json").read_bytes())
            raise RuntimeError("the save failed")
    nan = write_lora(lora.parent / "nan", value=float("nan"))
    staged = store.open_version("lora1")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (staged.path / name).write_bytes((nan / name).read_bytes())
    with pytest.raises(InvalidCheckpointError, match="NaN or inf"):
        staged.commit({"step": 2})
    assert store.versions("lora1") == [directory.name]
    assert not list((store.adapter_dir("lora1") / ".staging").iterdir())  # neither left anything behind


def test_write_weights_writes_what_safetensors_writes_hashed_as_written_and_the_commit_reads_none_back(
    store: CheckpointStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from safetensors.torch import load_file, save

    import vllm_lora_hotswap.store.staged as staged_module

    lora = write_lora(tmp_path / "src", rank=16, hidden=512, layers=8)  # over 1 MB: a writer thread
    tensors = load_file(lora / "adapter_model.safetensors")
    as_bytes = {k: TensorBytes("F32", tuple(t.shape), t.numpy()) for k, t in tensors.items()}
    config = (lora / "adapter_config.json").read_bytes()
    reads = []  # (file, whether its bytes were read) for each file the commit opens

    def recorded(path: Path, *args: Any, **kwargs: Any) -> bytes:
        reads.append((path.name, kwargs.get("keep", True)))
        return real(path, *args, **kwargs)

    real = staged_module._read_then_sync
    monkeypatch.setattr(staged_module, "_read_then_sync", recorded)
    old = os.umask(0o077)
    try:
        with store.open_version("lora1") as staged:
            staged.write_weights(as_bytes, {"format": "pt"})
            (staged.path / "adapter_config.json").write_bytes(config)
    finally:
        os.umask(old)
    assert ("adapter_model.safetensors", True) not in reads  # synced, never read back
    directory = store.version_dir("lora1", staged.version)
    assert (directory / "adapter_model.safetensors").read_bytes() == save(tensors, metadata={"format": "pt"})
    assert stat.S_IMODE(os.stat(directory / "adapter_model.safetensors").st_mode) == 0o644
    store.validate("lora1", staged.version)  # READY's sha256 is the file's
    first = staged.version

    # Several dtypes: a file safetensors reads back whole.
    mixed = {"a.weight": torch.randn(3, 5), "b.weight": torch.randn(4).half(), "c.weight": torch.arange(6)}
    dtypes = {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64"}
    staged = store.open_version("other")
    staged.write_weights({k: TensorBytes(dtypes[t.dtype], tuple(t.shape), t.numpy()) for k, t in mixed.items()})
    assert {k: v.tolist() for k, v in load_file(staged.path / "adapter_model.safetensors").items()} == {
        k: v.tolist() for k, v in mixed.items()
    }
    staged.abort()

    nan = torch.full((16, 512), float("nan"))
    with pytest.raises(InvalidCheckpointError, match="NaN or inf"):
        with store.open_version("lora1") as bad:
            bad.write_weights({**as_bytes, "x.lora_A.weight": TensorBytes("F32", (16, 512), nan.numpy())})
    with pytest.raises(ValueError, match="4 bytes for shape \\[2\\] of F32"):
        with store.open_version("lora1") as bad:
            bad.write_weights({"x": TensorBytes("F32", (2,), b"1234")})
    with pytest.raises(ValueError, match="unknown safetensors dtype 'F128'"):
        with store.open_version("lora1") as bad:
            bad.write_weights({"x": TensorBytes("F128", (1,), b"1234")})
    with pytest.raises(StoreError, match="File exists"):
        with store.open_version("lora1") as bad:
            bad.write_weights(as_bytes)
            bad.write_weights(as_bytes)
    with pytest.raises(InvalidCheckpointError, match="changed after write_weights"):
        with store.open_version("lora1") as bad:
            bad.write_weights(as_bytes)
            (bad.path / "adapter_config.json").write_bytes(config)
            with open(bad.path / "adapter_model.safetensors", "ab") as out:
                out.write(b"more")
    assert store.versions("lora1") == [first]
    assert not list((store.adapter_dir("lora1") / ".staging").iterdir())


def test_a_commit_or_abort_by_hand_inside_the_block_is_not_repeated_on_exit(
    store: CheckpointStore, lora: Path
) -> None:
    with store.open_version("lora1") as staged:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            (staged.path / name).write_bytes((lora / name).read_bytes())
        version = staged.commit({"loss": 0.5})  # metadata known only at the end
    assert store.versions("lora1") == [version] and store.validate("lora1", version).metadata["loss"] == 0.5
    with store.open_version("lora1") as dropped:
        dropped.abort()  # e.g. the trainer saw a NaN loss
    assert store.versions("lora1") == [version]


def test_checksum_mismatch_is_detected(store: CheckpointStore, lora: Path) -> None:
    version = store.publish("lora1", lora)
    weights = store.version_dir("lora1", version) / "adapter_model.safetensors"
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(InvalidCheckpointError, match="checksum mismatch"):
        store.validate("lora1", version)
    weights.write_bytes(bytes(data[:-10]))
    with pytest.raises(InvalidCheckpointError, match="READY records"):
        store.validate("lora1", version)


def test_non_lora_config_is_refused_and_nothing_is_published(store: CheckpointStore, tmp_path: Path) -> None:
    source = write_lora(tmp_path / "prefix", peft_type="PREFIX_TUNING")
    with pytest.raises(InvalidCheckpointError, match="peft_type is 'PREFIX_TUNING'"):
        store.publish("lora1", source)
    assert store.versions("lora1") == []


def test_bad_metadata_is_refused(store: CheckpointStore, lora: Path) -> None:
    with pytest.raises(InvalidCheckpointError, match="reserved"):
        store.publish("lora1", lora, {"version": "mine"})
    with pytest.raises(InvalidCheckpointError, match="JSON"):
        store.publish("lora1", lora, {"reward": float("nan")})
    with pytest.raises(InvalidCheckpointError, match="over the"):
        store.publish("lora1", lora, {"blob": "x" * (2 << 20)})


@pytest.mark.parametrize("name", ["../outside", "/tmp/abs", "a/b", ".hidden", "lora1@v"])
def test_path_traversal_names_write_nothing(store: CheckpointStore, lora: Path, tmp_path: Path, name: str) -> None:
    before = set(tmp_path.rglob("*"))
    with pytest.raises(InvalidNameError):
        store.publish(name, lora)
    assert set(tmp_path.rglob("*")) == before


def test_escaping_symlinks_are_refused(store: CheckpointStore, lora: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    store.root.mkdir()
    (store.root / "evil").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="outside the store root"):
        store.publish("evil", lora)
    assert list(outside.iterdir()) == []
    version = store.publish("lora1", lora)
    (store.adapter_dir("lora1") / "2030-01-01T00-00-00Z").symlink_to(outside)
    with pytest.raises(UnsafePathError):
        store.validate("lora1", "2030-01-01T00-00-00Z")
    assert store.active_version("lora1") == version


def test_pin_and_follow(store: CheckpointStore, lora: Path) -> None:
    v1 = store.publish("lora1", lora)
    v2 = store.publish("lora1", lora)
    assert store.active_version("lora1") == v2
    store.pin("lora1", v1)
    assert store.active_version("lora1") == v1 and store.pinned_version("lora1") == v1
    v3 = store.publish("lora1", lora)
    assert store.active_version("lora1") == v1
    store.follow("lora1")
    assert store.active_version("lora1") == v3
    with pytest.raises(NotFoundError):
        store.pin("lora1", "2020-01-01T00-00-00Z")


def test_failed_versions_are_skipped_and_change_the_poll_signature(store: CheckpointStore, lora: Path) -> None:
    v1 = store.publish("lora1", lora)
    v2 = store.publish("lora1", lora)
    signature = store.poll_signature("lora1")
    time.sleep(0.01)
    store.record_failure("lora1", v2, "host-a:8000", "probe", "NaN logprobs")
    assert store.poll_signature("lora1") != signature
    assert store.active_version("lora1") == v1
    (failure,) = store.failures("lora1", v2)
    assert failure.instance_id == "host-a:8000" and failure.reason == "NaN logprobs"
    assert [e.failed_on for e in store.entries("lora1")] == [(), ("host-a:8000",)]


def test_poll_signature_is_cheap_and_changes_on_publish(store: CheckpointStore, lora: Path) -> None:
    store.publish("lora1", lora)
    before = store.poll_signature("lora1")
    assert store.poll_signature("lora1") == before
    store.publish("lora1", lora)
    assert store.poll_signature("lora1") != before


def test_gc_keeps_pinned_kept_served_and_newest(store: CheckpointStore, lora: Path) -> None:
    versions = [store.publish("lora1", lora) for _ in range(6)]
    store.pin("lora1", versions[0])
    store.set_kept("lora1", versions[1], True)
    store.write_instance_record(
        InstanceRecord(
            instance_id="host-a:8000",
            heartbeat=time.time(),
            adapters={"lora1": AdapterServing(served_version=versions[2], installed_versions=[versions[2]])},
        )
    )
    # A stale instance protects nothing.
    store.write_instance_record(
        InstanceRecord(
            instance_id="host-b:8000",
            heartbeat=time.time() - 3600,
            adapters={"lora1": AdapterServing(served_version=versions[3])},
        )
    )
    report = store.gc(keep=1)
    assert report.deleted == [f"lora1/{versions[3]}", f"lora1/{versions[4]}"]
    assert store.versions("lora1") == [versions[0], versions[1], versions[2], versions[5]]
    store.follow("lora1")
    store.set_kept("lora1", versions[1], False)
    store.gc(keep=1)
    assert store.versions("lora1") == [versions[2], versions[5]]


def test_gc_removes_abandoned_partial_versions_after_the_grace(store: CheckpointStore, lora: Path) -> None:
    store.publish("lora1", lora)
    partial = store.adapter_dir("lora1") / "2030-01-01T00-00-00Z"  # weights without READY
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"partial")
    assert store.gc(grace=3600).abandoned == []
    assert store.gc(grace=0).abandoned == [str(partial)]
    assert not partial.exists() and len(store.versions("lora1")) == 1


def test_gc_removes_the_records_of_instances_gone_for_longer_than_the_grace(
    store: CheckpointStore, lora: Path
) -> None:
    store.publish("lora1", lora)
    now = time.time()
    store.write_instance_record(InstanceRecord(instance_id="alive:8000", heartbeat=now))
    store.write_instance_record(InstanceRecord(instance_id="stale:8000", heartbeat=now - 60))
    store.write_instance_record(InstanceRecord(instance_id="gone:8000", heartbeat=now - 7200))
    assert store.gc(grace=3600).instances == ["gone:8000"]
    assert sorted(r.instance_id for r in store.instance_records()) == ["alive:8000", "stale:8000"]


def test_retire_and_revive(store: CheckpointStore, lora: Path) -> None:
    store.publish("lora1", lora)
    store.retire("lora1")
    assert store.is_retired("lora1")
    store.publish("lora1", lora)
    assert not store.is_retired("lora1")


def test_instance_records_round_trip_and_damaged_ones_are_skipped(store: CheckpointStore) -> None:
    with pytest.raises(StoreUnavailableError):  # a heartbeat never creates a missing root
        store.write_instance_record(InstanceRecord(instance_id="host-a:8000"))
    assert not store.root.exists()
    store.root.mkdir()
    store.write_instance_record(InstanceRecord(instance_id="host-a:8000", heartbeat=time.time()))
    (store.root / ".instances" / "broken.json").write_text("{not json")
    (store.root / ".instances" / "deep.json").write_text("[" * 10000 + "]" * 10000)
    (record,) = store.instance_records()
    assert record.instance_id == "host-a:8000" and not record.is_stale()


def test_files_and_directories_are_not_group_or_world_writable(store: CheckpointStore, lora: Path) -> None:
    old = os.umask(0)
    try:
        version = store.publish("lora1", lora, {"reward": 1})
        store.pin("lora1", version)
        store.write_instance_record(InstanceRecord(instance_id="host-a:8000"))
    finally:
        os.umask(old)
    for path in [store.root, *store.root.rglob("*")]:
        mode = path.lstat().st_mode
        assert not mode & (stat.S_IWGRP | stat.S_IWOTH), f"{path} is {oct(mode)}"


@pytest.mark.parametrize("path", ["copy", "in place"])
def test_a_version_is_readable_by_every_engine_whatever_the_publishers_umask(
    tmp_path: Path, lora: Path, path: str
) -> None:
    """An engine may run as another user than the trainer: a publisher under umask 077 still
    publishes 0755 directories and 0644 files."""
    old = os.umask(0o077)
    try:
        store = CheckpointStore(tmp_path / "store")
        if path == "copy":
            version = store.publish("lora1", lora)
        else:
            with store.open_version("lora1") as staged:
                for name in ("adapter_config.json", "adapter_model.safetensors"):
                    (staged.path / name).write_bytes((lora / name).read_bytes())
            version = staged.version
        store.pin("lora1", version)
        store.write_instance_record(InstanceRecord(instance_id="host-a:8000"))
    finally:
        os.umask(old)
    for found in [store.root, *store.root.rglob("*")]:
        if found.name.startswith(".") and found.name != ".instances":
            continue  # the publish lock and the staging area are the publisher's own
        mode = stat.S_IMODE(found.lstat().st_mode)
        assert mode == (0o755 if found.is_dir() else 0o644), f"{found} is {oct(mode)}"


def test_gc_can_be_limited_to_some_adapters(store: CheckpointStore, lora: Path) -> None:
    for adapter in ("a", "b"):
        for _ in range(3):
            store.publish(adapter, lora)
    report = store.gc(keep=1, adapters=["a"])
    assert len(report.deleted) == 2 and all(name.startswith("a/") for name in report.deleted)
    assert len(store.versions("a")) == 1 and len(store.versions("b")) == 3


def test_a_failed_fsync_of_write_weights_fails_the_commit_and_publishes_nothing(
    store: CheckpointStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``write_weights`` returns once the file is written; its fsync goes on in the background and
    the commit waits for it: an fsync error there is the commit's one clear error."""
    import errno

    from safetensors.torch import load_file

    import vllm_lora_hotswap.store.staged as staged_module

    lora = write_lora(tmp_path / "src", rank=16, hidden=512, layers=8)  # over 1 MB: a writer thread
    tensors = {
        k: TensorBytes("F32", tuple(t.shape), t.numpy())
        for k, t in load_file(lora / "adapter_model.safetensors").items()
    }

    def broken(path: Path) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))

    monkeypatch.setattr(staged_module, "_fsync", broken)
    staged = store.open_version("lora1")
    staged.write_weights(tensors, {"format": "pt"})  # written: returns before the fsync's outcome
    (staged.path / "adapter_config.json").write_bytes((lora / "adapter_config.json").read_bytes())
    with pytest.raises(StoreError, match="Input/output error; nothing was published"):
        staged.commit()
    assert store.versions("lora1") == [] and not staged.path.exists()


def test_write_weights_returns_before_its_fsync_and_the_commit_waits_for_it(
    store: CheckpointStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller (the training step, for the callback) waits for the write only; the fsync goes on
    beside it, and the commit (the callback's background thread) waits for it. A small file is
    written inline and fsynced by the commit."""
    from safetensors.torch import load_file

    import vllm_lora_hotswap.store.staged as staged_module

    synced: list[str] = []
    started, release = threading.Event(), threading.Event()
    real = staged_module._fsync

    def slow(path: Path) -> None:
        started.set()
        release.wait(30)
        synced.append(threading.current_thread().name)
        real(path)

    monkeypatch.setattr(staged_module, "_fsync", slow)
    big = write_lora(tmp_path / "big", rank=16, hidden=512, layers=8)  # over 1 MB: a writer thread
    tensors = load_file(big / "adapter_model.safetensors")
    staged = store.open_version("lora1")
    staged.write_weights({k: TensorBytes("F32", tuple(t.shape), t.numpy()) for k, t in tensors.items()})
    assert started.wait(30) and not synced  # returned while its fsync is still running
    (staged.path / "adapter_config.json").write_bytes((big / "adapter_config.json").read_bytes())
    committing = threading.Thread(target=staged.commit)
    committing.start()
    committing.join(0.5)
    assert committing.is_alive() and staged.version is None  # the commit waits for that fsync
    release.set()
    committing.join(30)
    assert staged.version is not None and synced == ["hotswap-write"]

    small = write_lora(tmp_path / "small")
    tensors = load_file(small / "adapter_model.safetensors")
    staged = store.open_version("lora1")
    staged.write_weights({k: TensorBytes("F32", tuple(t.shape), t.numpy()) for k, t in tensors.items()})
    assert synced == ["hotswap-write"]  # written inline, not fsynced on the caller's thread
    (staged.path / "adapter_config.json").write_bytes((small / "adapter_config.json").read_bytes())
    staged.commit()
    assert synced == ["hotswap-write", threading.current_thread().name]  # by the commit


def test_the_written_hook_runs_once_the_weights_are_written_and_hashed_before_the_nan_check(
    store: CheckpointStore, tmp_path: Path
) -> None:
    """``open_version(on_written=...)`` (the callback's written notice) runs when the weight file is
    whole and hashed, so the engines read it while the floats are checked; a version whose check
    then fails is still never committed."""
    import torch
    from safetensors.torch import load_file

    lora = write_lora(tmp_path / "src", rank=16, hidden=512, layers=8)
    as_bytes = {
        k: TensorBytes("F32", tuple(t.shape), t.numpy())
        for k, t in load_file(lora / "adapter_model.safetensors").items()
    }
    seen: list[tuple[int, str, bool]] = []

    def hook(staged: Any) -> None:
        path = staged.path / "adapter_model.safetensors"
        digest = staged.weights_digest
        seen.append((digest.size, digest.sha256, path.stat().st_size == digest.size))
        raise RuntimeError("a failing hook does not fail the write")

    with store.open_version("lora1", on_written=hook) as staged:
        staged.write_weights(as_bytes, {"format": "pt"})
        (staged.path / "adapter_config.json").write_bytes((lora / "adapter_config.json").read_bytes())
    committed = store.validate("lora1", staged.version)
    ready = parse_ready((committed.path / "READY").read_bytes())
    assert len(seen) == 1 and seen[0][2]  # the file was whole when the hook ran
    assert ready.files["adapter_model.safetensors"] == FileDigest(*seen[0][:2])

    nan = torch.full((16, 512), float("nan"))
    with pytest.raises(InvalidCheckpointError, match="NaN or inf"):
        with store.open_version("lora1", on_written=hook) as bad:
            bad.write_weights({**as_bytes, "x.lora_A.weight": TensorBytes("F32", (16, 512), nan.numpy())})
    assert len(seen) == 2  # told before the check refused it
    assert store.versions("lora1") == [staged.version]
