"""Sharded training (DeepSpeed ZeRO-3, FSDP): detection, and gathering the adapter for saving.

Under sharded training the model a callback receives holds only this rank's
shard of each parameter, so saving it directly would write a partial adapter.
Only the detection is exercised by this project's tests (one CPU process);
the ZeRO-3 gathering follows what TRL itself does before generating
(``deepspeed.zero.GatheredParameters``) but has not been run here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

ZERO3 = "deepspeed-zero3"
FSDP = "fsdp"


def sharded_training(state: object | None) -> str | None:
    """``"deepspeed-zero3"``, ``"fsdp"`` or None for an accelerate ``AcceleratorState``-like object."""
    if state is None:
        return None
    if getattr(state, "fsdp_plugin", None) is not None:
        return FSDP
    deepspeed_plugin = getattr(state, "deepspeed_plugin", None)
    if deepspeed_plugin is not None and getattr(deepspeed_plugin, "zero_stage", None) == 3:
        return ZERO3
    return None


def current_accelerator_state() -> object | None:
    """The ``AcceleratorState`` a trainer set up in this process, or None."""
    from accelerate.state import AcceleratorState

    # Constructing AcceleratorState when no Accelerator exists would initialise
    # one with default settings; only read the state a trainer already set up.
    return AcceleratorState() if AcceleratorState._shared_state else None


@contextmanager
def gathered_adapter(model: Any, sharding: str | None) -> Iterator[None]:
    """Make the trainable (adapter) parameters whole for reading; a collective, every rank must enter."""
    if sharding != ZERO3:
        yield
        return
    import deepspeed

    # Only the trainable parameters: gathering the frozen base model would move
    # its full size through every rank at each publication.
    params = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield
