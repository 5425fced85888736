"""The checks a staged adapter passes before it goes into a LoRA slot, and its packing.

Why here: staging (:mod:`.worker`) runs them on an adapter built from the committed files,
and the read ahead (:mod:`.prepare_ahead`) on one built before the commit; both must refuse
the same adapters. What: no NaN/inf in any LoRA tensor (a version whose weights make
NaN/inf logits never reaches a slot), every tensor's shape against the model's layer (an
adapter for another base model is refused here instead of being copied half into a slot),
then vLLM's own packing (q/k/v and the like, into the model's packed modules) with the
scaling folded in, so that the slot copy is a plain copy.
"""

from __future__ import annotations

from typing import Any

import torch


def checked_for_slots(manager: Any, lora: Any) -> int:
    """Check ``lora`` (a vLLM ``LoRAModel``) against ``manager`` (the worker's LoRA model
    manager), pack and scale it in place, off the engine loop; the bytes it then holds."""
    check_finite(lora)
    check_fits(manager, lora)
    manager._create_merged_loras_inplace(lora)
    return sum(_nbytes(w.lora_a) + _nbytes(w.lora_b) for w in lora.loras.values())


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds no NaN or inf. A NaN or inf in it makes its sum NaN or inf, so a
    finite sum settles it in one reduction (a fifth of the element-wise check's time on a
    staging's worth of LoRA tensors); only a sum that is not finite (a bad value, or an
    overflow of finite ones) is checked element by element."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def check_finite(lora: Any) -> None:
    for module, weights in lora.loras.items():
        for tensor in (weights.lora_a, weights.lora_b):
            if tensor is not None and not all_finite(tensor):
                raise ValueError(f"LoRA weights of {module} hold NaN or inf")


def check_fits(manager: Any, lora: Any) -> None:
    """Shapes against the model's layers, so an adapter for another base model
    is refused here instead of being copied half into a slot."""
    packed = {sub: (name, i) for name, subs in manager.packed_modules.items() for i, sub in enumerate(subs)}
    for module_name, weights in lora.loras.items():
        target, index = packed.get(module_name, (module_name, None))
        layer = getattr(manager.modules.get(target), "base_layer", None)
        if layer is None or weights.lora_a is None or weights.lora_b is None:
            continue
        in_size = getattr(layer, "input_size", None)
        if isinstance(in_size, int) and weights.lora_a.shape[-1] != in_size:
            raise ValueError(
                f"{module_name}: lora_A takes {weights.lora_a.shape[-1]} inputs, the model's layer {in_size} "
                "(adapter made for a different base model?)"
            )
        sizes = getattr(layer, "output_sizes", None) if index is not None else [getattr(layer, "output_size", None)]
        if getattr(layer, "num_kv_head_replicas", 1) == 1 and sizes and isinstance(sizes[index or 0], int):
            if weights.lora_b.shape[0] != sizes[index or 0]:
                raise ValueError(
                    f"{module_name}: lora_B gives {weights.lora_b.shape[0]} outputs, the model's layer "
                    f"{sizes[index or 0]} (adapter made for a different base model?)"
                )


def _nbytes(tensor: Any) -> int:
    if isinstance(tensor, list):
        return sum(_nbytes(t) for t in tensor)
    return tensor.numel() * tensor.element_size() if tensor is not None else 0
