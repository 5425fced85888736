"""The ``hotswap_*`` methods ``collective_rpc`` reaches on every worker.

They are attached to ``WorkerWrapperBase`` (found first by the RPC's
``getattr``, for every executor) and forward to the worker's
:class:`~vllm_lora_hotswap.engine.worker.WorkerHotSwap`, imported on first use
so only worker processes pay for it. Arguments and results are plain values:
the RPC crosses process boundaries as msgpack.
"""

from __future__ import annotations

from typing import Any


def _hotswap(wrapper: Any):
    from .worker import hotswap_of

    return hotswap_of(wrapper.worker)


def hotswap_stage(self: Any, lora_id: int, name: str, path: str) -> None:
    _hotswap(self).stage(lora_id, name, path)


def hotswap_status(self: Any, lora_id: int, path: str) -> dict[str, Any]:
    return _hotswap(self).status(lora_id, path)


def hotswap_install(self: Any, lora_id: int, path: str, replace: bool) -> dict[str, Any]:
    return _hotswap(self).install(lora_id, path, replace)


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


RPC_METHODS = {
    f.__name__: f
    for f in (
        hotswap_stage,
        hotswap_status,
        hotswap_install,
        hotswap_restore,
        hotswap_commit,
        hotswap_remove,
        hotswap_reinstall,
        hotswap_state,
    )
}


def install_worker_rpcs() -> None:
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    for name, method in RPC_METHODS.items():
        setattr(WorkerWrapperBase, name, method)
