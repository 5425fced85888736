"""Trainer-side integrations: publish the adapter being trained into a hot-swap store.

Depends on ``vllm_lora_hotswap.store`` only (no vLLM import).
"""

from .hotswap import HotSwapCallback, Publication, WeightSyncClient
from .sharding import sharded_training

__all__ = ["HotSwapCallback", "Publication", "WeightSyncClient", "sharded_training"]
