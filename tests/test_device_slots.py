"""Slot writes off the step and the install's mapping flip, against vLLM's own LoRA
manager (its LRU caches and ``activate_adapter``) with small in-memory layers.

No engine runs: the manager is vLLM's class with the state a worker's has, so
vLLM's own activation competes with our reservations exactly as inside a step.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_lora_hotswap.engine.device_slots import SlotWriter

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
RANK, DIM = 4, 8


class Layer:
    """The part of a vLLM LoRA layer the manager uses: one stacked A and B, per slot."""

    def __init__(self, slots: int, device: str = "cpu"):
        self.a = torch.zeros(slots, RANK, DIM, device=device)
        self.b = torch.zeros(slots, DIM, RANK, device=device)
        self.writers: list[str] = []  # thread of every set_lora
        self.hold: threading.Event | None = None  # set_lora waits on it (a copy in progress)
        self.entered = threading.Event()

    def reset_lora(self, index: int) -> None:
        self.a[index] = 0
        self.b[index] = 0

    def set_lora(self, index: int, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        self.writers.append(threading.current_thread().name)
        self.entered.set()
        if self.hold is not None:
            self.hold.wait(10)
        self.reset_lora(index)
        self.a[index, : lora_a.shape[0]].copy_(lora_a, non_blocking=True)
        self.b[index, :, : lora_b.shape[1]].copy_(lora_b, non_blocking=True)


def make_manager(slots: int = 2, cpu: int = 4, modules: int = 2, device: str = "cpu"):
    from vllm.lora.model_manager import AdapterLRUCache, LRUCacheLoRAModelManager

    manager = LRUCacheLoRAModelManager.__new__(LRUCacheLoRAModelManager)
    manager.lora_config = SimpleNamespace(max_loras=slots, max_cpu_loras=cpu)
    manager._registered_adapters = AdapterLRUCache(cpu, manager.deactivate_adapter)
    manager._active_adapters = AdapterLRUCache(slots, manager._deactivate_adapter)
    manager.lora_index_to_id = [None] * slots
    manager.modules = {f"layer{i}": Layer(slots, device) for i in range(modules)}
    manager.is_pooling_model = False
    manager._last_mapping = None
    manager.device = torch.device(device)
    return manager


def make_lora(lora_id: int, value: float, modules: int = 2):
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.lora_weights import LoRALayerWeights

    loras = {
        f"layer{i}": LoRALayerWeights(
            f"layer{i}", RANK, RANK, torch.full((RANK, DIM), value), torch.full((DIM, RANK), value), scaling=1.0
        )
        for i in range(modules)
    }
    return LoRAModel(lora_id, RANK, loras)


def register(manager, lora) -> None:
    manager._registered_adapters[lora.id] = lora


def slot_values(manager, index: int) -> set[float]:
    return {float(layer.a[index].max().cpu()) for layer in manager.modules.values()}


def consistent(manager) -> bool:
    """vLLM's own invariant: the active set names exactly the slots that are taken."""
    taken = [key for key in manager.lora_index_to_id if key is not None]
    return sorted(taken) == sorted(manager._active_adapters.cache)


def test_a_staged_adapter_is_written_off_the_step_and_installed_by_a_flip() -> None:
    manager = make_manager()
    slots = SlotWriter(manager)
    lora = make_lora(7, 3.0)
    reservation = slots.reserve()
    assert reservation is not None and consistent(manager)
    writer = threading.Thread(target=slots.write, args=(reservation, lora), name="staging")
    writer.start()
    writer.join()
    assert 7 not in manager.lora_index_to_id  # written, not yet visible
    register(manager, lora)
    assert slots.claim(reservation, 7, replace=False)
    assert manager.lora_index_to_id[reservation.index] == 7 and consistent(manager)
    assert slot_values(manager, reservation.index) == {3.0}
    manager.activate_adapter(7)  # what every step does for a running adapter: nothing left to copy
    assert all(layer.writers == ["staging"] for layer in manager.modules.values())


def test_without_a_free_slot_the_least_recently_used_idle_adapter_gives_its_slot() -> None:
    from vllm.lora.layers import LoRAMapping

    manager = make_manager(slots=2)
    slots = SlotWriter(manager)
    for lora_id in (1, 2):
        register(manager, make_lora(lora_id, float(lora_id)))
        manager.activate_adapter(lora_id)
    manager.activate_adapter(1)  # 2 is now the least recently used
    manager._last_mapping = LoRAMapping(index_mapping=(2, 2), prompt_mapping=(2,))  # ... but the running batch uses it
    reservation = slots.reserve()
    assert reservation is not None and manager.lora_index_to_id[reservation.index] == reservation.key
    assert 2 in manager.lora_index_to_id and 1 not in manager.lora_index_to_id and consistent(manager)
    manager._last_mapping = LoRAMapping(index_mapping=(2,), prompt_mapping=(2,))
    assert slots.reserve() is None  # the batch uses the only adapter left in a slot


def test_a_slot_held_ahead_of_a_commit_is_only_a_free_one_and_the_first_given_up() -> None:
    """A slot for a version not committed yet (engine/prepare_ahead.py) never evicts an adapter;
    a committed version's stage takes it before evicting an idle adapter, and so does vLLM's LRU
    in a step; adopted by its own stage, it is an ordinary reservation again."""
    manager = make_manager(slots=2)
    slots = SlotWriter(manager)
    for lora_id in (1, 2, 3):
        register(manager, make_lora(lora_id, float(lora_id)))
    manager.activate_adapter(1)
    held = slots.reserve(ahead=True)
    assert held is not None and held.ahead and slots.reserve(ahead=True) is None  # no free slot: no eviction
    assert slots.write(held, make_lora(9, 9.0))
    stage = slots.reserve()  # a committed version's stage: the slot held ahead goes first, adapter 1 stays
    assert stage is not None and stage.index == held.index and held.lost
    assert 1 in manager.lora_index_to_id and consistent(manager)
    assert not slots.adopt(held)  # its own stage comes too late: it reserves again
    slots.release(stage)
    held = slots.reserve(ahead=True)
    assert held is not None and slots.write(held, make_lora(9, 9.0))
    manager.activate_adapter(2)  # a step needs a slot: vLLM's LRU takes the held one, though 1 is older
    assert held.lost and manager.lora_index_to_id == [1, 2] and consistent(manager)
    manager.deactivate_adapter(2)
    held = slots.reserve(ahead=True)
    assert held is not None and slots.write(held, make_lora(9, 9.0)) and slots.adopt(held) and not held.ahead
    register(manager, make_lora(9, 9.0))
    assert slots.claim(held, 9, replace=False) and slot_values(manager, held.index) == {9.0}
    assert consistent(manager)


def test_vllm_taking_a_reserved_slot_stops_the_write_and_the_install_copies_instead() -> None:
    manager = make_manager(slots=2)
    slots = SlotWriter(manager)
    for lora_id in (1, 2):
        register(manager, make_lora(lora_id, float(lora_id)))
    manager.activate_adapter(1)
    reservation = slots.reserve()
    assert reservation is not None
    first = manager.modules["layer0"]
    first.hold = threading.Event()
    writer = threading.Thread(target=slots.write, args=(reservation, make_lora(9, 9.0)), name="staging")
    writer.start()
    assert first.entered.wait(10)  # the staging thread is copying layer0 into the reserved slot
    manager.activate_adapter(1)  # a step touches adapter 1: our reservation is now the oldest
    evicting = threading.Thread(target=manager.activate_adapter, args=(2,), name="step")  # a batch needs adapter 2
    evicting.start()
    evicting.join(0.2)
    assert evicting.is_alive(), "vLLM's copy must wait for the module copy in progress"
    first.hold.set()
    evicting.join(10)
    writer.join(10)
    assert reservation.lost
    assert manager.lora_index_to_id[reservation.index] == 2 and consistent(manager)
    assert slot_values(manager, reservation.index) == {2.0}  # vLLM's adapter, not half of ours
    assert all(layer.writers[-1] == "step" for layer in manager.modules.values())  # no write of ours after vLLM's
    assert not slots.claim(reservation, 9, replace=False)  # the install falls back to copying
    assert consistent(manager)


def test_a_replacement_flips_back_in_one_step_or_frees_the_old_slot() -> None:
    manager = make_manager(slots=2)
    slots = SlotWriter(manager)
    register(manager, make_lora(5, 1.0))
    manager.activate_adapter(5)
    old_index = manager.lora_index_to_id.index(5)

    def replace() -> int:
        reservation = slots.reserve()
        assert reservation is not None
        slots.write(reservation, make_lora(5, 2.0))
        assert slots.claim(reservation, 5, replace=True)
        assert consistent(manager)
        return reservation.index

    new_index = replace()
    assert manager.lora_index_to_id[new_index] == 5 and slot_values(manager, new_index) == {2.0}
    assert manager.lora_index_to_id[old_index] is not None  # still reserved: the old weights wait for the probe
    assert slots.restore(5)  # a failed probe
    assert manager.lora_index_to_id == [5 if i == old_index else None for i in range(2)] and consistent(manager)
    assert slot_values(manager, old_index) == {1.0}

    new_index = replace()
    slots.commit(5)  # the probe passed
    assert manager.lora_index_to_id == [5 if i == new_index else None for i in range(2)] and consistent(manager)


def test_a_released_reservation_frees_its_slot() -> None:
    manager = make_manager(slots=2)
    slots = SlotWriter(manager)
    reservation = slots.reserve()
    assert reservation is not None
    slots.release(reservation)
    assert manager.lora_index_to_id == [None, None] and consistent(manager)


def test_a_reset_of_every_adapter_loses_the_reservations() -> None:
    manager = make_manager(slots=2)
    slots = SlotWriter(manager)
    reservation = slots.reserve()
    assert reservation is not None
    manager.remove_all_adapters()  # vLLM after a base-weight update
    assert reservation.lost
    assert not slots.write(reservation, make_lora(3, 3.0))
    assert not slots.claim(reservation, 3, replace=False)
    assert manager.lora_index_to_id == [None, None] and consistent(manager)


MAX_RANK = 16


def linear_layer(slots: int):
    """vLLM's own linear LoRA layer (its reset_lora and set_lora), with small stacked slots."""
    from vllm.lora.layers import ReplicatedLinearWithLoRA

    layer = ReplicatedLinearWithLoRA.__new__(ReplicatedLinearWithLoRA)
    torch.nn.Module.__init__(layer)
    layer.tp_size, layer.n_slices = 1, 1
    layer.lora_a_stacked = (torch.zeros(slots, 1, MAX_RANK, DIM),)
    layer.lora_b_stacked = (torch.zeros(slots, 1, DIM, MAX_RANK),)
    return layer


def ranked_lora(lora_id: int, rank: int, value: float):
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.lora_weights import LoRALayerWeights

    weights = LoRALayerWeights(
        "proj", rank, rank, torch.full((rank, DIM), value), torch.full((DIM, rank), value), scaling=1.0
    )
    return LoRAModel(lora_id, rank, {"proj": weights})


def stage_into_the_slot(slots: SlotWriter, lora) -> int:
    reservation = slots.reserve()
    assert reservation is not None and slots.write(reservation, lora)
    slots.release(reservation)  # only the slot's contents matter here
    return reservation.index


def rows_holding(layer, index: int) -> list[float]:
    """The largest value in each rank row of slot ``index`` (A and B agree)."""
    a, b = layer.lora_a_stacked[0][index, 0], layer.lora_b_stacked[0][index, 0]
    assert torch.equal(a.amax(dim=1), b.amax(dim=0))
    return a.amax(dim=1).tolist()


def test_a_slot_written_again_is_cleared_in_the_rows_its_last_adapter_wrote() -> None:
    manager = make_manager(slots=1, modules=0)
    layer = manager.modules["proj"] = linear_layer(slots=1)
    slots = SlotWriter(manager)

    assert stage_into_the_slot(slots, ranked_lora(1, 16, 1.0)) == 0  # history unknown: the whole slot
    assert rows_holding(layer, 0) == [1.0] * 16 and slots.dirty_rows == {0: 16}
    stage_into_the_slot(slots, ranked_lora(2, 4, 2.0))
    assert rows_holding(layer, 0) == [2.0] * 4 + [0.0] * 12  # rank 16's rows are gone
    assert slots.dirty_rows == {0: 4}

    # Rows 8-15 are clean now; mark them to see that the next write leaves them untouched.
    layer.lora_a_stacked[0][0, 0, 8:] = layer.lora_b_stacked[0][0, 0, :, 8:] = 7.0
    stage_into_the_slot(slots, ranked_lora(3, 4, 3.0))
    assert rows_holding(layer, 0) == [3.0] * 4 + [0.0] * 4 + [7.0] * 8  # 4 rows cleared, not 16


def test_a_slot_vllm_copied_into_is_cleared_as_far_as_that_adapter_wrote() -> None:
    manager = make_manager(slots=1, modules=0)
    layer = manager.modules["proj"] = linear_layer(slots=1)
    slots = SlotWriter(manager)
    register(manager, ranked_lora(5, 8, 5.0))
    manager.activate_adapter(5)  # vLLM's own copy, in a step: the whole slot cleared first
    assert slots.dirty_rows == {0: 8}
    manager.deactivate_adapter(5)
    stage_into_the_slot(slots, ranked_lora(6, 2, 6.0))
    assert rows_holding(layer, 0) == [6.0] * 2 + [0.0] * 14

    # vLLM's own clears stay whole: a thread that is not writing a reservation is never limited.
    layer.lora_a_stacked[0][0, 0, 12:] = layer.lora_b_stacked[0][0, 0, :, 12:] = 7.0
    layer.reset_lora(0)
    assert rows_holding(layer, 0) == [0.0] * 16


@pytest.mark.gpu
def test_on_cuda_the_copy_runs_on_a_side_stream_and_the_install_waits_for_it() -> None:
    manager = make_manager(device="cuda")
    slots = SlotWriter(manager)
    lora = make_lora(4, 4.0)
    for weights in lora.loras.values():
        weights.lora_a, weights.lora_b = weights.lora_a.pin_memory(), weights.lora_b.pin_memory()
    reservation = slots.reserve()
    assert reservation is not None
    writer = threading.Thread(target=slots.write, args=(reservation, lora), name="staging")
    writer.start()
    writer.join()
    assert reservation.event is not None
    register(manager, lora)
    assert slots.claim(reservation, 4, replace=False)  # the default stream now waits for the copy
    assert slot_values(manager, reservation.index) == {4.0}


def worker_with(manager):
    """A worker's hot-swap state around ``manager``, with no vLLM worker behind it."""
    from vllm_lora_hotswap.engine.cache_room import CacheRoom
    from vllm_lora_hotswap.engine.worker import WorkerHotSwap

    hotswap = WorkerHotSwap.__new__(WorkerHotSwap)
    hotswap.worker_manager = SimpleNamespace(_adapter_manager=manager)
    hotswap.staging, hotswap.installed, hotswap.previous = {}, {}, {}
    hotswap._lock, hotswap.channel, hotswap.step_copies = threading.Lock(), None, 0
    hotswap.slots, hotswap.cache_room = SlotWriter(manager), CacheRoom(manager)
    return hotswap


def staged(hotswap, lora_id: int, value: float, *, written: bool = True):
    from vllm_lora_hotswap.engine.worker import _Staged

    lora = make_lora(lora_id, value)
    entry = _Staged(lora_id, f"a@v{lora_id}", f"/store/a/v{lora_id}", state="ready", lora=lora)
    entry.slot = hotswap.slots.reserve()
    if written:
        assert hotswap.slots.write(entry.slot, lora)
    hotswap.staging[lora_id, entry.path] = entry
    return entry


def test_an_install_off_the_step_is_a_flip_made_once_and_never_a_copy() -> None:
    """The stage channel's install runs while a step may: it flips a written slot, says
    ``in_step`` for anything that needs a copy (left to the install RPC between steps),
    and an install that also came by RPC (its channel answer was late) is made once."""
    manager = make_manager(slots=2)
    hotswap = worker_with(manager)
    entry = staged(hotswap, 7, 3.0)
    index = entry.slot.index
    result = hotswap.install_off_step(7, entry.path)
    assert result["ok"] and result["seconds"] >= 0
    assert manager.lora_index_to_id[index] == 7 and consistent(manager)
    assert hotswap.install(7, entry.path, replace=False) == {"ok": True, "error": None}  # the late RPC: no-op
    assert hotswap.step_copies == 0 and manager.lora_index_to_id.count(7) == 1

    unwritten = staged(hotswap, 8, 4.0, written=False)  # e.g. vLLM took the slot while it was written
    refused = hotswap.install_off_step(8, unwritten.path)
    assert refused["in_step"] and not refused["ok"]
    assert 8 not in manager.list_adapters() and 8 not in manager.lora_index_to_id  # nothing half-done
    hotswap.slots.release(unwritten.slot)
    unwritten.slot = None
    assert hotswap.install(8, unwritten.path, replace=False)["ok"]  # the RPC copies it, between steps
    assert hotswap.step_copies == 1 and slot_values(manager, manager.lora_index_to_id.index(8)) == {4.0}


def test_an_install_off_the_step_waits_for_a_step_start_that_holds_the_slot_lock() -> None:
    manager = make_manager(slots=2)
    hotswap = worker_with(manager)
    entry = staged(hotswap, 7, 3.0)
    done = threading.Event()
    with hotswap.slots.lock:  # what set_active_adapters holds at the start of a step
        threading.Thread(target=lambda: (hotswap.install_off_step(7, entry.path), done.set()), daemon=True).start()
        assert not done.wait(0.2)
        assert 7 not in manager.lora_index_to_id
    assert done.wait(5) and 7 in manager.lora_index_to_id


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(
        st.one_of(st.floats(width=32), st.sampled_from([3.0e38, -3.0e38, 1.0e-45])), min_size=0, max_size=64
    ),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_the_finite_check_agrees_with_the_element_wise_one(values: list[float], dtype: torch.dtype) -> None:
    """Staging's one-reduction check of LoRA weights gives isfinite().all()'s answer for any values,
    overflowing sums of finite ones included."""
    from vllm_lora_hotswap.engine.adapter_checks import all_finite

    tensor = torch.tensor(values, dtype=torch.float32).to(dtype)
    assert all_finite(tensor) == bool(torch.isfinite(tensor).all())
