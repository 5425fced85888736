"""Adapters built ahead of their commit from the bytes read ahead (engine/prepare_ahead.py).

No engine runs: vLLM's own loader (``LoRAModel.from_local_checkpoint`` with its PEFT
helper, which its worker manager calls) builds the adapter, and a slot writer fake stands
for the device slots. What is checked: staging adopts what was built only when READY
records the sha256 of both files it was built from, and a slot held for a version that is
never staged is given back.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.support.fake import MODULES, write_lora
from vllm_lora_hotswap.engine import read_ahead, single_read
from vllm_lora_hotswap.engine.prepare_ahead import AdapterPreparer, PreparedAdapter
from vllm_lora_hotswap.engine.read_ahead import ReadsAhead
from vllm_lora_hotswap.engine.single_read import SingleRead
from vllm_lora_hotswap.store import CheckpointStore


@pytest.fixture(autouse=True)
def reads_ahead() -> Iterator[ReadsAhead]:
    fresh = ReadsAhead()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(read_ahead, "READS_AHEAD", fresh)
        patch.setattr(single_read, "READS_AHEAD", fresh)
        yield fresh


@dataclass
class FakeSlots:
    """The slot writer's part a preparer uses: a free slot or none, a write, a release."""

    free: int = 1
    reserved: list[Any] = field(default_factory=list)
    released: list[Any] = field(default_factory=list)
    written: list[Any] = field(default_factory=list)

    def reserve(self, *, ahead: bool = False) -> Any:
        assert ahead  # a version that may never be committed never evicts an adapter
        if self.free == 0:
            return None
        self.free -= 1
        slot = object()
        self.reserved.append(slot)
        return slot

    def write(self, slot: Any, lora: Any) -> bool:
        self.written.append(lora)
        return True

    def release(self, slot: Any) -> None:
        # The real release waits for the slot lock, which a step may hold: never under the reads' lock.
        assert not read_ahead.READS_AHEAD._lock.locked()
        self.released.append(slot)
        self.free += 1


def vllm_load(request: Any) -> Any:
    """What vLLM's worker manager's ``_load_adapter`` runs for a Llama's q/v adapter."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    peft = PEFTHelper.from_local_dir(request.lora_path, None)
    return LoRAModel.from_local_checkpoint(
        request.lora_path, set(MODULES), peft, lora_model_id=request.lora_int_id, device="cpu", dtype=torch.float32
    )


def checked(lora: Any) -> int:
    return sum(w.lora_a.numel() * 4 + w.lora_b.numel() * 4 for w in lora.loras.values())


def _staged_with(store: CheckpointStore, source: Path) -> Any:
    staged = store.open_version("lora1")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (staged.path / name).write_bytes((source / name).read_bytes())
    return staged


def _prepare_ahead(staged: Any, slots: FakeSlots) -> tuple[str, AdapterPreparer]:
    """What a worker does on a written notice: read the weights ahead and build from them."""
    weights = staged.path / "adapter_model.safetensors"
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    preparer = AdapterPreparer(vllm_load, checked, slots)  # type: ignore[arg-type]
    assert read_ahead.READS_AHEAD.start(str(weights), sha, weights.stat().st_size, prepare=preparer)
    read_ahead.READS_AHEAD._entries[sha].data.result(30)
    return sha, preparer


def test_an_adapter_built_ahead_is_adopted_with_its_slot_when_ready_records_both_files(
    tmp_path: Path,
) -> None:
    store, slots = CheckpointStore(tmp_path / "store"), FakeSlots()
    source = write_lora(tmp_path / "src")
    staged = _staged_with(store, source)
    sha, preparer = _prepare_ahead(staged, slots)
    assert preparer.built == 1 and len(slots.reserved) == 1 and len(slots.written) == 1
    directory = store.version_dir("lora1", staged.commit())
    with SingleRead(directory) as read:
        pass  # no load: the adapter was built ahead
    read.verify()
    prepared = read.prepared
    assert isinstance(prepared, PreparedAdapter) and read.from_memory and read.read_ahead
    lora = prepared.adopt(7)
    assert lora.id == 7 and prepared.take_slot() is slots.reserved[0] and not slots.released
    expected = load_file(source / "adapter_model.safetensors")
    a = expected["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert torch.equal(lora.loras["model.layers.0.self_attn.q_proj"].lora_a, a)


def test_a_config_changed_after_the_read_ahead_makes_staging_build_from_the_commit(tmp_path: Path) -> None:
    store, slots = CheckpointStore(tmp_path / "store"), FakeSlots()
    source = write_lora(tmp_path / "src")
    staged = _staged_with(store, source)
    _prepare_ahead(staged, slots)
    config = json.loads((staged.path / "adapter_config.json").read_text())
    config["lora_alpha"] = config["lora_alpha"] * 2  # another scaling: other outputs
    (staged.path / "adapter_config.json").write_text(json.dumps(config))
    directory = store.version_dir("lora1", staged.commit())
    with SingleRead(directory) as read:
        pass
    assert read.prepared is None and not read.read_ahead
    assert slots.released == slots.reserved  # its slot is free again


def test_a_slot_held_for_a_commit_that_never_comes_is_given_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, slots = CheckpointStore(tmp_path / "store"), FakeSlots()
    _prepare_ahead(_staged_with(store, write_lora(tmp_path / "src")), slots)
    assert slots.free == 0
    monkeypatch.setattr(read_ahead, "MAX_AGE_S", 0.0)
    read_ahead.READS_AHEAD.take("0" * 64)  # any later look at the entries drops the stale ones
    assert slots.released == slots.reserved and slots.free == 1


def test_a_slot_prepared_after_its_stage_gave_up_waiting_is_given_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slots, release = FakeSlots(), threading.Event()
    source = write_lora(tmp_path / "src")
    preparer = AdapterPreparer(vllm_load, checked, slots)  # type: ignore[arg-type]

    def slow(path: str, directory: int, data: bytearray) -> PreparedAdapter | None:
        release.wait(30)
        return preparer(path, directory, data)

    weights = source / "adapter_model.safetensors"
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    monkeypatch.setattr(read_ahead, "TAKE_PATIENCE_S", 0.05)
    assert read_ahead.READS_AHEAD.start(str(weights), sha, weights.stat().st_size, prepare=slow)
    assert read_ahead.READS_AHEAD.take(sha) is None  # staging reads the committed file instead
    release.set()
    for _ in range(300):
        if slots.released:
            break
        threading.Event().wait(0.1)
    assert slots.released == slots.reserved and len(slots.reserved) == 1


def test_no_free_slot_or_no_config_or_a_failing_build(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "store")
    source = write_lora(tmp_path / "src")
    # No free slot: built all the same, the stage writes it into a slot.
    slots = FakeSlots(free=0)
    staged = _staged_with(store, source)
    _sha, preparer = _prepare_ahead(staged, slots)
    directory = store.version_dir("lora1", staged.commit())
    with SingleRead(directory) as read:
        pass
    assert read.prepared is not None and read.prepared.take_slot() is None and preparer.built == 1
    # No config in the staging directory yet: nothing built, the bytes are kept for staging.
    staged = store.open_version("lora1")
    (staged.path / "adapter_model.safetensors").write_bytes((source / "adapter_model.safetensors").read_bytes())
    sha, preparer = _prepare_ahead(staged, FakeSlots())
    assert preparer.failed == 1
    assert read_ahead.READS_AHEAD.take(sha) == (source / "adapter_model.safetensors").read_bytes()
    staged.abort()
    # vLLM's loader refuses it (a module this model lacks): nothing built; staging says why.
    bad = write_lora(tmp_path / "bad", modules=("q_proj", "not_a_module"), seed=3)
    staged = _staged_with(store, bad)
    sha, preparer = _prepare_ahead(staged, FakeSlots())
    assert preparer.failed == 1 and preparer.built == 0
    staged.abort()


def test_a_commit_that_renames_the_staging_directory_mid_build_is_no_obstacle(tmp_path: Path) -> None:
    """The publisher commits while the worker builds (the usual order on an RL step): the
    worker holds the staging directory open, so the config is read from it after the rename."""
    store, slots = CheckpointStore(tmp_path / "store"), FakeSlots()
    staged = _staged_with(store, write_lora(tmp_path / "src"))
    preparer = AdapterPreparer(vllm_load, checked, slots)  # type: ignore[arg-type]
    versions: list[str] = []

    def commit_first(path: str, directory: int, data: bytearray) -> PreparedAdapter | None:
        versions.append(staged.commit())
        return preparer(path, directory, data)

    weights = staged.path / "adapter_model.safetensors"
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert read_ahead.READS_AHEAD.start(str(weights), sha, weights.stat().st_size, prepare=commit_first)
    read_ahead.READS_AHEAD._entries[sha].data.result(30)
    assert not staged.path.exists() and preparer.built == 1
    with SingleRead(store.version_dir("lora1", versions[0])) as read:
        pass
    assert read.prepared is not None and read.prepared.take_slot() is slots.reserved[0]


def test_a_notice_that_comes_after_the_commit_is_read_from_the_committed_version(tmp_path: Path) -> None:
    """The commit renamed the staging directory before the worker got to it (the notice was
    late): the worker reads the newest version whose READY gives the weight file that sha256."""
    store, slots = CheckpointStore(tmp_path / "store"), FakeSlots()
    store.publish("lora1", write_lora(tmp_path / "older", seed=1))  # an older version: not the one
    staged = _staged_with(store, write_lora(tmp_path / "src"))
    weights = staged.path / "adapter_model.safetensors"
    sha, size = hashlib.sha256(weights.read_bytes()).hexdigest(), weights.stat().st_size
    version = staged.commit()
    # Three newer versions: the one announced is the fourth newest, behind LATEST and RETIRED
    # in the listing (which are no versions and take no place in the look-back).
    for seed in (2, 3, 4):
        store.publish("lora1", write_lora(tmp_path / f"newer-{seed}", seed=seed))
    (store.adapter_dir("lora1") / "RETIRED").write_text("")
    preparer = AdapterPreparer(vllm_load, checked, slots)  # type: ignore[arg-type]
    assert read_ahead.READS_AHEAD.start(str(weights), sha, size, prepare=preparer)
    read_ahead.READS_AHEAD._entries[sha].data.result(30)
    assert preparer.built == 1
    with SingleRead(store.version_dir("lora1", version)) as read:
        pass
    assert read.prepared is not None and read.prepared.take_slot() is slots.reserved[0]
    # A sha256 that no recent version has: nothing read, staging reads the commit.
    assert read_ahead.READS_AHEAD.start(str(weights), "0" * 64, size, prepare=preparer)
    assert read_ahead.READS_AHEAD.take("0" * 64) is None and preparer.built == 1
