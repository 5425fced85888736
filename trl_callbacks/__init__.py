"""Trainer-side integrations: publish the adapter being trained into a hot-swap store, and
generate GRPO rollouts on the engines that follow it.

Depends on ``vllm_lora_hotswap.store`` only (no vLLM import).
"""

from .adapter_files import save_adapter
from .hotswap import HotSwapCallback, Publication, WeightSyncClient
from .rollout import FleetRollout, RolloutRecord
from .sharding import sharded_training

__all__ = [
    "FleetRollout",
    "HotSwapCallback",
    "Publication",
    "RolloutRecord",
    "WeightSyncClient",
    "save_adapter",
    "sharded_training",
]
