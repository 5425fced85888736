"""One read per engine: staging hashes the weight file against READY from the bytes vLLM's
loader builds the adapter from, and validation before it leaves the weight file unread.
No engine runs: vLLM's loader is called on its own, as a worker's staging thread calls it."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.fake import write_lora
from tests.support.fake_engine import wait_until
from tests.support.inject import inject_version
from vllm_lora_hotswap.engine import read_ahead, single_read
from vllm_lora_hotswap.engine.read_ahead import MAX_BYTES, MAX_ENTRIES, ReadsAhead, read_regular_file
from vllm_lora_hotswap.engine.single_read import SingleRead
from vllm_lora_hotswap.store import CheckpointStore, InvalidCheckpointError


@pytest.fixture(autouse=True)
def reads_ahead() -> Iterator[ReadsAhead]:
    """A worker's reads ahead of its own for each test: none left behind by another (patched
    apart from the test's ``monkeypatch``, which a test may undo)."""
    fresh = ReadsAhead()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(read_ahead, "READS_AHEAD", fresh)
        patch.setattr(single_read, "READS_AHEAD", fresh)
        yield fresh


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "store")


def _load_as_vllm_does(directory: Path) -> dict[str, torch.Tensor]:
    from vllm.lora import lora_model

    with lora_model.safetensors.safe_open(os.path.join(directory, "adapter_model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - as vLLM iterates


def _flip_last_byte(directory: Path) -> None:
    weights = directory / "adapter_model.safetensors"
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))


def test_vllm_loads_the_bytes_that_were_read_and_hashed_once(
    store: CheckpointStore, tmp_path: Path, monkeypatch
) -> None:
    source = write_lora(tmp_path / "src")
    directory = store.version_dir("lora1", store.publish("lora1", source))
    assert single_read.INSTALLED
    opened: list[str] = []
    real_open = open

    def counting_open(path, *args, **kwargs):  # every open of the weight file in this thread
        if str(path).endswith("adapter_model.safetensors"):
            opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    with SingleRead(directory) as read:
        tensors = _load_as_vllm_does(directory)
    read.verify()
    monkeypatch.undo()
    assert read.from_memory and len(opened) == 1
    expected = load_file(source / "adapter_model.safetensors")
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[k], expected[k]) for k in expected)
    # Outside the block (or in another thread) vLLM's safe_open reads the file as before.
    again = _load_as_vllm_does(directory)
    assert all(torch.equal(again[k], expected[k]) for k in expected)


def test_a_byte_changed_after_ready_fails_the_verification_that_gates_the_install(
    store: CheckpointStore, tmp_path: Path
) -> None:
    directory = store.version_dir("lora1", store.publish("lora1", write_lora(tmp_path / "src")))
    _flip_last_byte(directory)
    store.validate("lora1", directory.name, read_weights=False)  # the light validation cannot tell...
    with SingleRead(directory) as read:
        _load_as_vllm_does(directory)
    with pytest.raises(InvalidCheckpointError, match="checksum mismatch"):
        read.verify()  # ...the one read does
    with pytest.raises(InvalidCheckpointError, match="checksum mismatch"):
        store.validate("lora1", directory.name)


def test_a_load_that_fails_on_a_torn_file_is_named_a_checksum_mismatch(store: CheckpointStore, tmp_path: Path) -> None:
    directory = store.version_dir("lora1", store.publish("lora1", write_lora(tmp_path / "src")))
    weights = directory / "adapter_model.safetensors"
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\x00" * 8  # the header's first bytes: unparsable, same size
    weights.write_bytes(bytes(data))
    with pytest.raises(InvalidCheckpointError, match="checksum mismatch"):
        with SingleRead(directory):
            pass


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda w: w.write_bytes(w.read_bytes()[:-64]), "truncated"),
        (lambda w: w.write_bytes(os.urandom(4096)), "corrupt"),
    ],
)
def test_damage_recorded_in_ready_is_refused_by_the_read(
    store: CheckpointStore, tmp_path: Path, damage, reason: str
) -> None:
    source = write_lora(tmp_path / "bad")
    damage(source / "adapter_model.safetensors")
    version = inject_version(store, "lora1", source)  # READY hashes the damaged file
    directory = store.version_dir("lora1", version)
    with pytest.raises(InvalidCheckpointError, match=reason):
        with SingleRead(directory):
            pass


def test_vllm_scaling_the_tensors_in_place_does_not_change_the_digest(store: CheckpointStore, tmp_path: Path) -> None:
    """The tensors vLLM gets are views of the bytes read, and vLLM scales some in place: the
    digest is of the bytes as read. A large file (once hashed beside the load) included."""
    for name, hidden in (("small", 128), ("large", 2048)):  # the large one is over 2 MB
        directory = store.version_dir(name, store.publish(name, write_lora(tmp_path / name, hidden=hidden, rank=64)))
        with SingleRead(directory) as read:
            for tensor in _load_as_vllm_does(directory).values():
                tensor.mul_(2.0)  # as vLLM's loader scales lora_b
        read.verify()
        assert read.from_memory, name


# -- reads ahead of the commit (engine/read_ahead.py) ------------------------------------------
def _read_ahead_then_commit(store: CheckpointStore, source: Path, claimed: str | None = None) -> tuple[Path, bool]:
    """Write ``source`` into a staged version, read its weight file ahead as a worker does on a
    notice (claiming ``claimed`` as its sha256, default the true one), then commit; returns the
    version's directory and whether the read ahead was kept."""
    staged = store.open_version("lora1")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (staged.path / name).write_bytes((source / name).read_bytes())
    weights = staged.path / "adapter_model.safetensors"
    sha = claimed or hashlib.sha256(weights.read_bytes()).hexdigest()
    assert read_ahead.READS_AHEAD.start(str(weights), sha, weights.stat().st_size)
    kept = read_ahead.READS_AHEAD._entries[sha].data.result(10) is not None  # the read runs in a thread
    return store.version_dir("lora1", staged.commit()), kept


def test_a_read_ahead_that_hashes_to_ready_is_staged_from_without_reading_the_file(
    store: CheckpointStore, tmp_path: Path, monkeypatch
) -> None:
    source = write_lora(tmp_path / "src")
    directory, kept = _read_ahead_then_commit(store, source)
    assert kept
    opened: list[str] = []
    real_open = open
    monkeypatch.setattr(
        "builtins.open",
        lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k),  # type: ignore[func-returns-value]
    )
    taken = read_ahead.READS_AHEAD.taken
    with SingleRead(directory) as read:
        tensors = _load_as_vllm_does(directory)
    read.verify()
    monkeypatch.undo()
    assert read.read_ahead and read.from_memory and read_ahead.READS_AHEAD.taken == taken + 1
    assert not [p for p in opened if p.endswith("adapter_model.safetensors")]  # no read of the committed file
    expected = load_file(source / "adapter_model.safetensors")
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    with SingleRead(directory) as again:  # taken once: the next stage of it reads the file
        _load_as_vllm_does(directory)
    assert not again.read_ahead and again.from_memory


def test_a_read_ahead_is_used_only_when_ready_records_its_sha256(store: CheckpointStore, tmp_path: Path) -> None:
    source = write_lora(tmp_path / "src")
    # A notice whose sha256 is not the file's: nothing is kept; staging reads the file.
    directory, kept = _read_ahead_then_commit(store, source, claimed="0" * 64)
    assert not kept
    with SingleRead(directory) as read:
        _load_as_vllm_does(directory)
    read.verify()
    assert not read.read_ahead and read.from_memory
    # A file read ahead, then replaced before the commit: READY records the new bytes, so the
    # read ahead (of the old ones) is never taken.
    other = write_lora(tmp_path / "other", seed=7)
    staged = store.open_version("lora1")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (staged.path / name).write_bytes((source / name).read_bytes())
    weights = staged.path / "adapter_model.safetensors"
    old_sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    read_ahead.READS_AHEAD._entries.pop(old_sha, None)
    assert read_ahead.READS_AHEAD.start(str(weights), old_sha, weights.stat().st_size)
    assert read_ahead.READS_AHEAD._entries[old_sha].data.result(10) is not None
    weights.unlink()
    weights.write_bytes((other / "adapter_model.safetensors").read_bytes())
    directory = store.version_dir("lora1", staged.commit())
    with SingleRead(directory) as read:
        tensors = _load_as_vllm_does(directory)
    read.verify()
    assert not read.read_ahead
    expected = load_file(other / "adapter_model.safetensors")
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)


def test_a_read_ahead_reads_only_a_regular_file_of_the_announced_size(tmp_path: Path, monkeypatch) -> None:
    data = os.urandom(4096)
    (tmp_path / "file").write_bytes(data)
    assert read_regular_file(str(tmp_path / "file"), 4096) == data
    assert read_regular_file(str(tmp_path / "file"), 4095) is None  # another size
    os.symlink(tmp_path / "file", tmp_path / "link")
    with pytest.raises(OSError):  # a symlink at the end is not followed
        read_regular_file(str(tmp_path / "link"), 4096)
    os.mkfifo(tmp_path / "fifo")
    assert read_regular_file(str(tmp_path / "fifo"), 4096) is None  # no writer: returns, never blocks
    reads = ReadsAhead()
    assert not reads.start(str(tmp_path / "file"), "0" * 64, MAX_BYTES + 1)  # too large: not even tried
    assert not reads.start(str(tmp_path / "file"), "0" * 64, 0)
    assert reads.start(str(tmp_path / "missing"), "1" * 64, 4096)
    assert reads.take("1" * 64) is None  # the read failed: nothing to take, nothing raised

    def settle() -> None:
        for entry in list(reads._entries.values()):
            entry.data.result(10)

    def fill(names: str) -> None:
        for name in names:
            assert reads.start(str(tmp_path / "file"), name * 64, 4096), name

    # Room: at most MAX_ENTRIES held; a finished read makes room (the oldest first)...
    fill("0123"[:MAX_ENTRIES])
    settle()
    monkeypatch.setattr(read_ahead, "read_regular_file", lambda *_, **__: time.sleep(0.5))  # reads that take a while
    fill("5")
    assert "0" * 64 not in reads._entries and len(reads._entries) == MAX_ENTRIES
    # ...but a read still running never does: a flood of notices waits for none.
    for name in "123":
        assert reads.take(name * 64) is None  # hashed to another sha256 than claimed: nothing to take
    fill("678")
    assert not reads.start(str(tmp_path / "file"), "a" * 64, 4096)
    settle()
    monkeypatch.setattr(read_ahead, "MAX_BYTES", 2 * 4096)  # and at most MAX_BYTES held in all
    fill("b")
    assert len(reads._entries) == 2
    time.sleep(0.01)
    monkeypatch.setattr(read_ahead, "MAX_AGE_S", 0.0)  # none taken in time (commits that never came)...
    fill("c")
    assert list(reads._entries) == ["b" * 64, "c" * 64]  # ...is dropped once read: "b" is still being read
    swept = ReadsAhead()
    assert swept.start(str(tmp_path / "file"), "d" * 64, 4096)
    wait_until(lambda: not swept._entries, "the sweeper to drop it without another notice")
