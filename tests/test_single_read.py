"""One read per engine: staging hashes the weight file against READY from the bytes vLLM's
loader builds the adapter from, and validation before it leaves the weight file unread.
No engine runs: vLLM's loader is called on its own, as a worker's staging thread calls it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.fake import write_lora
from tests.support.inject import inject_version
from vllm_lora_hotswap.engine import single_read
from vllm_lora_hotswap.engine.single_read import SingleRead
from vllm_lora_hotswap.store import CheckpointStore, InvalidCheckpointError


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
