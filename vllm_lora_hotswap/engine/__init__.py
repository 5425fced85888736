"""The engine side of the plugin: worker RPCs, API-server hooks and version routing.
With :mod:`vllm_lora_hotswap.weights` (base-weight updates) it is where vLLM internals are
touched; a vLLM upgrade is edited here, and :mod:`vllm_lora_hotswap.compat.vllm_symbols`
lists every private symbol used and checks them."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..settings import HotSwapSettings


def install_hooks(settings: HotSwapSettings) -> None:
    """Everything the plugin adds to vLLM; cheap, and safe in every process vLLM starts."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    from ..weights.spec import install_recorder
    from .device_slots import install_slot_reset
    from .endpoints import enable_endpoint_plugin
    from .idle_spin import install_idle_spin
    from .lora_metrics import count_requests_by_adapter
    from .rpc import install_worker_rpcs
    from .worker import install_lora_manager_hooks

    install_worker_rpcs()
    install_lora_manager_hooks()
    install_slot_reset()
    install_recorder()
    enable_endpoint_plugin()
    count_requests_by_adapter()
    if settings.idle_spin is not None:
        install_idle_spin(settings.idle_spin)
    # Lazy registration by module path: weights.gloo is imported only where used.
    for factory, class_name in (
        (WeightTransferEngineFactory, "GlooWeightTransferEngine"),
        (WeightTransferTrainerFactory, "GlooTrainerWeightTransferEngine"),
    ):
        if "gloo" not in factory._registry:
            factory.register_engine("gloo", "vllm_lora_hotswap.weights.gloo", class_name)
