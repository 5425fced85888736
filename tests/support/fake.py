"""Small PEFT-format LoRA checkpoints written directly (no model needed): for store tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

MODULES = ("q_proj", "v_proj")


def write_lora(
    directory: Path,
    *,
    rank: int = 8,
    hidden: int = 128,
    layers: int = 2,
    seed: int = 0,
    peft_type: str = "LORA",
    base_model: str = "tiny-llama",
    value: float | None = None,
    extra_config: dict | None = None,
    modules: tuple[str, ...] = MODULES,
) -> Path:
    """A PEFT LoRA for a Llama with ``hidden`` size; ``value`` fills every weight (e.g. NaN)."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for module in modules:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            a = torch.randn(rank, hidden, generator=generator)
            b = torch.randn(hidden, rank, generator=generator)
            if value is not None:
                a.fill_(value)
                b.fill_(value)
            tensors[f"{prefix}.lora_A.weight"] = a
            tensors[f"{prefix}.lora_B.weight"] = b
    save_file(tensors, directory / "adapter_model.safetensors")
    config = {
        "peft_type": peft_type,
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(modules),
        "base_model_name_or_path": base_model,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        **(extra_config or {}),
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory
