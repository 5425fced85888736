"""``make gpu-check``: the plugin's CUDA paths that need no vLLM engine, run on one GPU.

Why: the CPU machines that build and test this project have no GPU, and the GPU
machines a task may borrow are short-lived, have torch but no vLLM, and take a
small source tree. So this is one script, torch only, a few minutes long, that
runs the plugin's own CUDA code and says in one JSON line what held:

* ``side_stream_copy``: :class:`~vllm_lora_hotswap.engine.device_slots.SlotWriter`
  writes adapters from pinned host memory into slot-shaped CUDA tensors on its
  side stream, from a staging thread; the install's flip makes the engine's
  stream wait on the copy's event, and a read on that stream right after the
  flip finds every byte (tensor equality, adapters of falling rank, so the
  limited clear of a slot's old rank rows is checked on CUDA too).
* ``off_step_flip``: the flip made while a step may run waits for the copy on
  the installing thread (``event.synchronize``) instead.
* ``lost_slot``: vLLM's LRU takes a reserved slot while it is being written:
  the write stops, and the engine's stream waits for the copy in flight
  before vLLM's own copy into that slot, which then holds vLLM's weights only.
* ``race_visible`` (a control, never a failure): the same read without the wait.
  When it sees a partial copy, the checks above could have seen one too.
* ``reload_memory``: :func:`~vllm_lora_hotswap.weights.reload.free_bytes` on
  CUDA, and an update too large for the device refused by
  :func:`~vllm_lora_hotswap.weights.reload.shortfall` with the settings to change.
* ``figures``: :mod:`benchmarks.gpu_copy` (pinned against pageable copies, and
  a side-stream copy beside matmuls).

vLLM's two LoRA layer classes that ``device_slots`` imports, and its LoRA
manager, are stand-ins here with vLLM's semantics (``set_lora`` clears the
slot, then copies the adapter's rows ``non_blocking``; the manager's LRU calls
its deactivate hook on eviction). What only a full GPU vLLM run shows is listed
in the README: vLLM's own kernels reading the slots, its loader's pinning, NCCL
transfers, and the step timing of an install.

Without a GPU (or without torch) it says so, claims nothing and exits 0::

    make gpu-check                      # or: python -m benchmarks.gpu_check [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

SLOTS, MODULES, HIDDEN, MAX_RANK = 3, 16, 4096, 128  # one slot: 16 x (128 x 4096 + 4096 x 128) floats, 64 MiB
RANKS = (128, 32, 8)  # falling: each write must clear the rows the previous adapter left


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the JSON result to this file")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        return _report({"ok": None, "note": "torch is not installed: nothing was checked"}, args.out)
    if not torch.cuda.is_available():
        return _report({"ok": None, "note": "no CUDA device on this machine: nothing was checked"}, args.out)
    started = time.perf_counter()
    _install_vllm_stand_ins()
    checks: dict[str, dict[str, Any]] = {}
    for name, check in (
        ("side_stream_copy", check_side_stream_copy),
        ("off_step_flip", check_off_step_flip),
        ("lost_slot", check_lost_slot),
        ("race_visible", check_race_visible),
        ("reload_memory", check_reload_memory),
    ):
        try:
            checks[name] = check()
        except Exception as exc:  # one check's crash is its failure, the others still run
            checks[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    from benchmarks import gpu_copy

    figures = gpu_copy.measure({"2MB": 2 << 20, "10MB": 10 << 20, "40MB": 40 << 20, "160MB": 160 << 20})
    result = {
        "ok": all(c["ok"] for name, c in checks.items() if name != "race_visible"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "seconds": round(time.perf_counter() - started, 1),
        "checks": checks,
        "figures": figures,
    }
    return _report(result, args.out)


def _report(result: dict[str, Any], out: str | None) -> int:
    line = json.dumps(result, sort_keys=True)
    print(line, flush=True)
    if out:
        Path(out).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 1 if result["ok"] is False else 0


# -- vLLM stand-ins -------------------------------------------------------------------------


def _install_vllm_stand_ins() -> None:
    """``vllm.lora.layers`` as ``device_slots`` imports it, with vLLM's ``set_lora`` and
    ``reset_lora`` (vllm/lora/layers/base_linear.py); installed in place of any vLLM."""

    class BaseLinearLayerWithLoRA:
        def __init__(self, slots: int, max_rank: int, size: int) -> None:
            import torch

            self.n_slices, self.tp_size = 1, 1
            self.lora_a_stacked = (torch.zeros(slots, 1, max_rank, size, device="cuda"),)
            self.lora_b_stacked = (torch.zeros(slots, 1, size, max_rank, device="cuda"),)

        def reset_lora(self, index: int) -> None:
            for s_index in range(self.n_slices):
                self.lora_a_stacked[s_index][index] = 0
                self.lora_b_stacked[s_index][index] = 0

        def set_lora(self, index: int, lora_a: Any, lora_b: Any) -> None:
            self.reset_lora(index)
            self.lora_a_stacked[0][index, 0, : lora_a.shape[0], : lora_a.shape[1]].copy_(lora_a, non_blocking=True)
            self.lora_b_stacked[0][index, 0, : lora_b.shape[0], : lora_b.shape[1]].copy_(lora_b, non_blocking=True)

    class ClassificationHeadWithLoRA:  # never instantiated here
        pass

    names = ("vllm", "vllm.lora", "vllm.lora.layers", "vllm.lora.layers.base_linear")
    modules = {name: types.ModuleType(name) for name in names}
    modules["vllm.lora.layers"].ClassificationHeadWithLoRA = ClassificationHeadWithLoRA  # type: ignore[attr-defined]
    modules["vllm.lora.layers.base_linear"].BaseLinearLayerWithLoRA = BaseLinearLayerWithLoRA  # type: ignore[attr-defined]
    sys.modules.update(modules)


class _AdapterLRU:
    """vLLM's ``AdapterLRUCache`` as the slot writer uses it: ``deactivate_fn`` on removal."""

    def __init__(self, deactivate_fn: Any) -> None:
        self.data: OrderedDict[int, Any] = OrderedDict()
        self.deactivate_fn = deactivate_fn
        self.pinned_items: set[int] = set()

    @property
    def order(self) -> list[int]:
        return list(self.data)

    def __setitem__(self, key: int, value: Any) -> None:
        self.data[key] = value
        self.data.move_to_end(key)

    def __contains__(self, key: int) -> bool:
        return key in self.data

    def pop(self, key: int, default: Any = None) -> Any:
        if key not in self.data:
            return default
        self.deactivate_fn(key)
        return self.data.pop(key)


class _Manager:
    """The part of vLLM's ``LRUCacheLoRAModelManager`` the slot writer reads and calls."""

    def __init__(self) -> None:
        import torch
        from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

        self.device = torch.device("cuda")
        self.modules = {f"layers.{i}.proj": BaseLinearLayerWithLoRA(SLOTS, MAX_RANK, HIDDEN) for i in range(MODULES)}
        self.lora_index_to_id: list[int | None] = [None] * SLOTS
        self._active_adapters = _AdapterLRU(self._deactivate_adapter)
        self._registered_adapters: dict[int, Any] = {}
        self._last_mapping = None

    def _deactivate_adapter(self, key: int) -> None:
        if key in self.lora_index_to_id:
            self.lora_index_to_id[self.lora_index_to_id.index(key)] = None

    def deactivate_adapter(self, key: int) -> bool:
        return self._active_adapters.pop(key) is not None or key in self.lora_index_to_id

    def activate_adapter(self, lora_id: int) -> bool:
        """vLLM's copy into a free slot, in the step (on the engine's stream)."""
        index = self.lora_index_to_id.index(None)
        self.lora_index_to_id[index] = lora_id
        self._active_adapters[lora_id] = None
        lora = self._registered_adapters[lora_id]
        for name, module in self.modules.items():
            weights = lora.loras[name]
            module.set_lora(index, weights.lora_a, weights.lora_b)
        return True

    def _get_lora_layer_weights(self, lora: Any, module_name: str) -> Any:
        return lora.loras.get(module_name)

    def _get_module_to_save_weights(self, lora: Any, module_name: str) -> Any:
        return None


def _adapter(lora_id: int, rank: int, seed: int) -> Any:
    """An adapter whose A and B are pinned host tensors (as vLLM's loader makes them on a GPU)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    loras = {}
    for i in range(MODULES):
        a = torch.randn(rank, HIDDEN, generator=generator).pin_memory()
        b = torch.randn(HIDDEN, rank, generator=generator).pin_memory()
        loras[f"layers.{i}.proj"] = types.SimpleNamespace(lora_a=a, lora_b=b)
    return types.SimpleNamespace(id=lora_id, loras=loras)


def _expected(lora: Any, name: str, rank: int) -> tuple[Any, Any]:
    import torch

    a = torch.zeros(1, MAX_RANK, HIDDEN)
    b = torch.zeros(1, HIDDEN, MAX_RANK)
    a[0, :rank] = lora.loras[name].lora_a
    b[0, :, :rank] = lora.loras[name].lora_b
    return a, b


def _mismatches(manager: _Manager, index: int, lora: Any, rank: int, snapshot: dict[str, Any]) -> list[str]:
    import torch

    wrong = []
    for name in manager.modules:
        a, b = _expected(lora, name, rank)
        if not (torch.equal(snapshot[name][0].cpu(), a) and torch.equal(snapshot[name][1].cpu(), b)):
            wrong.append(name)
    return wrong


def _snapshot(manager: _Manager, index: int) -> dict[str, Any]:
    """Clones of slot ``index`` made on the engine's (current) stream, as a step would read it."""
    return {
        name: (module.lora_a_stacked[0][index].clone(), module.lora_b_stacked[0][index].clone())
        for name, module in manager.modules.items()
    }


def _write_on_a_staging_thread(slots: Any, reservation: Any, lora: Any) -> bool:
    written: list[bool] = []
    thread = threading.Thread(target=lambda: written.append(slots.write(reservation, lora)), name="staging")
    thread.start()
    thread.join()
    return bool(written and written[0])


def check_side_stream_copy(off_step: bool = False) -> dict[str, Any]:
    import torch

    from vllm_lora_hotswap.engine.device_slots import SlotWriter

    manager = _Manager()
    slots = SlotWriter(manager)
    wrong: list[str] = []
    timings = []
    for round_, rank in enumerate(RANKS):  # the same slot each round: its old rows must be cleared
        lora = _adapter(10 + round_, rank, seed=round_)
        reservation = slots.reserve()
        assert reservation is not None and reservation.index == 0, reservation
        started = time.perf_counter()
        assert _write_on_a_staging_thread(slots, reservation, lora), "the write reported a lost slot"
        assert reservation.event is not None, "no CUDA event recorded after the side-stream copy"
        manager._registered_adapters[lora.id] = lora
        assert slots.claim(reservation, lora.id, replace=False, off_step=off_step)
        snapshot = _snapshot(manager, reservation.index)  # enqueued right after the flip
        torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
        wrong += [f"rank {rank}: {name}" for name in _mismatches(manager, reservation.index, lora, rank, snapshot)]
        manager._active_adapters.pop(lora.id)  # frees the slot for the next round
    return {
        "ok": not wrong,
        "mismatched": wrong[:5],
        "slot_mib": _slot_mib(),
        "rounds_s": [round(t, 4) for t in timings],
    }


def check_off_step_flip() -> dict[str, Any]:
    return check_side_stream_copy(off_step=True)


def check_lost_slot() -> dict[str, Any]:
    """vLLM's LRU takes the slot while the staging thread writes module 2 of 16."""
    import torch

    from vllm_lora_hotswap.engine.device_slots import SlotWriter

    manager = _Manager()
    slots = SlotWriter(manager)
    ours, vllms = _adapter(21, MAX_RANK, seed=21), _adapter(22, MAX_RANK, seed=22)
    reservation = slots.reserve()
    assert reservation is not None
    layer = manager.modules["layers.2.proj"]
    entered, release = threading.Event(), threading.Event()
    set_lora = layer.set_lora

    def held_set_lora(index: int, a: Any, b: Any) -> None:
        entered.set()
        release.wait(30)
        set_lora(index, a, b)

    layer.set_lora = held_set_lora  # type: ignore[method-assign]
    written: list[bool] = []
    thread = threading.Thread(target=lambda: written.append(slots.write(reservation, ours)), name="staging")
    thread.start()
    assert entered.wait(30), "the write never reached module 2"
    evicted = threading.Thread(target=lambda: manager._active_adapters.pop(reservation.key))
    evicted.start()  # waits for module 2's copy (the reservation's lock), then marks it lost
    time.sleep(0.5)  # let it reach that lock before the copy goes on
    release.set()
    evicted.join(30)
    thread.join(30)
    layer.set_lora = set_lora  # type: ignore[method-assign]
    manager._registered_adapters[vllms.id] = vllms
    manager.activate_adapter(vllms.id)  # vLLM's own copy into the slot, on the engine's stream
    index = manager.lora_index_to_id.index(vllms.id)
    snapshot = _snapshot(manager, index)
    torch.cuda.synchronize()
    wrong = _mismatches(manager, index, vllms, MAX_RANK, snapshot)
    ok = written == [False] and index == reservation.index and not wrong
    return {"ok": ok, "write_returned": written, "lost": slots.lost, "mismatched": wrong[:5]}


def check_race_visible() -> dict[str, Any]:
    """The copy and an immediate read on the engine's stream with no wait between them."""
    import torch

    manager = _Manager()
    lora = _adapter(31, MAX_RANK, seed=31)
    side = torch.cuda.Stream()
    seen = 0
    for _ in range(5):
        for module in manager.modules.values():
            module.reset_lora(0)
        torch.cuda.synchronize()
        with torch.cuda.stream(side):
            for name, module in manager.modules.items():
                module.set_lora(0, lora.loras[name].lora_a, lora.loras[name].lora_b)
        snapshot = _snapshot(manager, 0)  # no wait_event: may run while the copies do
        torch.cuda.synchronize()
        seen += bool(_mismatches(manager, 0, lora, MAX_RANK, snapshot))
    return {"ok": True, "partial_reads_seen": seen, "of": 5}


def check_reload_memory() -> dict[str, Any]:
    import torch

    from vllm_lora_hotswap.weights import reload

    device = torch.device("cuda")
    model = torch.nn.Sequential(*(torch.nn.Linear(HIDDEN, HIDDEN) for _ in range(4))).to(device)
    free = reload.free_bytes(device)
    total = torch.cuda.get_device_properties(device).total_memory
    reload.reload_lifecycle = lambda: False  # type: ignore[assignment] # no vLLM here: the plugin's own figures
    fits = reload.shortfall(model, device, update_bytes=1 << 20)
    too_big = reload.shortfall(model, device, update_bytes=1 << 62)  # host memory: refused
    huge = torch.nn.Linear(1, 1).to(device)
    reload.largest_layer_bytes = lambda _model: total  # type: ignore[assignment] # a layer as large as the GPU
    short = reload.shortfall(huge, device, update_bytes=1 << 20)
    refused_host = too_big is not None and "host memory" in too_big
    refused_device = short is not None and "free cuda memory" in short and "--gpu-memory-utilization" in short
    ok = 0 < free <= total and fits is None and refused_host and refused_device
    gib = 1 << 30
    return {"ok": ok, "free_gib": round(free / gib, 2), "total_gib": round(total / gib, 2), "refusal": short}


def _slot_mib() -> float:
    return MODULES * 2 * MAX_RANK * HIDDEN * 4 / (1 << 20)


if __name__ == "__main__":
    sys.exit(main())
