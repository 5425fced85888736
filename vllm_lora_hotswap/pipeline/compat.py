"""vLLM's own conditions on an adapter, checked before any byte is staged."""

from __future__ import annotations

from ..store import AdapterConfig
from .engine_api import CheckpointRejected, EngineLimits


def check_compatible(config: AdapterConfig, limits: EngineLimits) -> None:
    """Raise :class:`CheckpointRejected` if the engine could not serve an adapter with ``config``."""
    rank = max([config.r, *config.rank_pattern.values()])
    if rank > limits.max_lora_rank:
        raise CheckpointRejected(
            "validate", f"rank {rank} exceeds the engine's --max-lora-rank {limits.max_lora_rank}"
        )
    if config.bias != "none":
        raise CheckpointRejected("validate", f"bias={config.bias!r}: vLLM serves LoRA adapters only with bias='none'")
    if config.base_model and limits.base_models:
        wanted = {_model_key(m) for m in limits.base_models}
        if _model_key(config.base_model) not in wanted:
            raise CheckpointRejected(
                "validate",
                f"trained on base model {config.base_model!r}; this engine serves {limits.base_models[0]!r}",
            )


def _model_key(name: str) -> str:
    """``org/name``, a local path and ``name`` all mean the same model."""
    return name.rstrip("/").rsplit("/", 1)[-1].lower()
