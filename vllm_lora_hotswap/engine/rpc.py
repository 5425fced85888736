"""The ``hotswap_*`` methods ``collective_rpc`` reaches on every worker.

They are attached to ``WorkerWrapperBase`` (found first by the RPC's
``getattr``, for every executor) and forward to the worker's
:class:`~vllm_lora_hotswap.engine.worker.WorkerHotSwap`, imported on first use
so only worker processes pay for it. Arguments and results are plain values:
the RPC crosses process boundaries as msgpack.
"""

from __future__ import annotations

import sys
import time
from typing import Any


def _hotswap(wrapper: Any):
    from .worker import hotswap_of

    return hotswap_of(wrapper.worker)


def hotswap_stage(self: Any, items: list[list[Any]]) -> None:
    """``items``: ``[lora_id, name, path]`` each."""
    hotswap = _hotswap(self)
    for lora_id, name, path in items:
        hotswap.stage(lora_id, name, path)


def hotswap_channel(self: Any, directory: str) -> str | None:
    """Bind the worker's end of the API server's stage channel in ``directory``; its socket path."""
    return _hotswap(self).open_channel(directory)


def hotswap_status(self: Any, items: list[list[Any]]) -> list[dict[str, Any]]:
    """``items``: ``[lora_id, name, path]`` each; one status per item (an item this worker
    was never asked to stage is staged now)."""
    hotswap = _hotswap(self)
    return [hotswap.status_or_stage(lora_id, name, path) for lora_id, name, path in items]


def hotswap_install(self: Any, items: list[list[Any]]) -> dict[str, Any]:
    """``items``: ``[lora_id, path, replace]`` each, installed at this one step boundary."""
    return _hotswap(self).install_many(items)


def hotswap_restore(self: Any, lora_id: int) -> None:
    _hotswap(self).restore(lora_id)


def hotswap_commit(self: Any, lora_id: int) -> None:
    _hotswap(self).commit(lora_id)


def hotswap_remove(self: Any, lora_id: int, path: str) -> None:
    _hotswap(self).remove(lora_id, path)


def hotswap_reinstall(self: Any) -> int:
    return _hotswap(self).reinstall()


def hotswap_state(self: Any) -> dict[str, Any]:
    return _hotswap(self).state()


def hotswap_weight_spec(self: Any) -> dict[str, list[Any]] | None:
    """``{name: [shape, dtype]}`` a base-weight update may contain (None if not recorded)."""
    from ..weights.spec import spec_of

    spec = spec_of(self.worker.weight_transfer_engine.model)
    return None if spec is None else {name: [list(shape), dtype] for name, (shape, dtype) in spec.items()}


def _reinstall(wrapper: Any) -> None:
    hotswap = getattr(wrapper.worker, "_lora_hotswap", None)
    if hotswap is not None:
        hotswap.reinstall()


def update_weights(self: Any, update_info: Any) -> None:
    """vLLM 0.34 marks the weights incomplete when an update starts, until a successful
    finish. An update the gloo backend ends before replacing any layer (refused, or cut
    off in transfer) leaves them complete, so the mark is taken back; any other failure
    keeps it, as vLLM's own engines do (their weights may be half-replaced)."""
    from ..weights.reload import NothingLoaded

    try:
        self.worker.update_weights(update_info)
    except NothingLoaded:
        incomplete = getattr(self.worker, "_incomplete_weight_updates", None)
        if incomplete is not None:
            incomplete.discard(self.worker._weight_update_is_draft)
        raise


def finish_weight_update(self: Any) -> None:
    """vLLM drops every adapter at the end of a base-weight update (``reset_lora_state``);
    ours are registered again at once, from their staged copies, not re-read from disk."""
    self.worker.finish_weight_update()
    _reinstall(self)


def reload_weights(self: Any, *args: Any, **kwargs: Any) -> Any:
    """Same as :func:`finish_weight_update` for vLLM's other base-weight path."""
    result = self.worker.reload_weights(*args, **kwargs)
    _reinstall(self)
    return result


RPC_METHODS = {
    f.__name__: f
    for f in (
        hotswap_stage,
        hotswap_channel,
        hotswap_status,
        hotswap_install,
        hotswap_restore,
        hotswap_commit,
        hotswap_remove,
        hotswap_reinstall,
        hotswap_state,
        hotswap_weight_spec,
        update_weights,
        finish_weight_update,
        reload_weights,
    )
}


def hotswap_timed_rpc(self: Any, method: str, timeout: float | None, args: tuple[Any, ...]) -> dict[str, Any]:
    """An engine-core utility: ``collective_rpc``, and how long it held the engine core
    between two steps (the round trip to every worker included): an install's stall."""
    started = time.perf_counter()
    results = self.collective_rpc(method, timeout, args)
    return {"held_s": time.perf_counter() - started, "results": results}


def install_worker_rpcs() -> None:
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    for name, method in RPC_METHODS.items():
        setattr(WorkerWrapperBase, name, method)
    # The engine core loads plugins while its module is being used; other processes
    # never call engine-core utilities, and need not import it.
    core = sys.modules.get("vllm.v1.engine.core")
    if core is not None:
        core.EngineCore.hotswap_timed_rpc = hotswap_timed_rpc
