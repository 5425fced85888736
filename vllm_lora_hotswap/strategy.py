"""``LoRARLStrategy``: the RL-strategy API that goes with the scheduler API, publishing real adapter weights.

The RL-strategy API's ``update_lora_weights(lora_id, new_weights, reward, metadata)``
receives what an RL loop has after an update and turns it into a new version
of adapter ``lora<id>``, either directly into a :class:`CheckpointStore` or
through a fleet scheduler with the scheduler API's ``publish_lora_update``. No vLLM
import: this runs in trainer processes.

Example::

    strategy = LoRARLStrategy("/cpfs/lora_ckpts")          # or a CheckpointStore, or a scheduler
    version = await strategy.update_lora_weights(1, peft_model, reward=0.92, metadata={"episode": 1000})
    stats = await strategy.get_training_stats()            # {"total_updates": 1, "reward_stats": {...}}
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .store import CheckpointStore, NotFoundError, check_adapter_name, validate_checkpoint_dir
from .store.checkpoint import CONFIG_FILE, SAFETENSORS_FILE

# A raw ``model.state_dict()`` slice keeps PEFT's adapter name ("...lora_A.default.weight");
# PEFT would load such keys under a doubled name and silently leave the adapter untrained.
_KEY_WITH_ADAPTER_NAME = re.compile(r".*\.lora_(?:embedding_)?[AB]\.[^.]+\.weight")
_WHAT_TO_PASS = (
    "pass a PEFT model, a (state_dict, LoraConfig) pair, {'state_dict': ..., 'config': LoraConfig or dict}, "
    "or the path of a saved PEFT adapter directory"
)


class LoraScheduler(Protocol):
    """The scheduler API, as far as publishing goes."""

    async def publish_lora_update(self, lora_id: Any, src_ckpt_dir: str, metadata: dict[str, Any]) -> str: ...


@dataclass
class RewardStats:
    """Rewards of successful updates, in publication order."""

    rewards: list[float] = field(default_factory=list)
    last_version: str | None = None

    def summary(self) -> dict[str, Any]:
        values = self.rewards
        return {
            "avg": sum(values) / len(values) if values else None,
            "max": max(values, default=None),
            "min": min(values, default=None),
            "last": values[-1] if values else None,
            "count": len(values),
        }


def adapter_name(lora_id: int | str) -> str:
    """``1`` → ``"lora1"`` (the scheduler API's naming); a string is taken as the adapter name itself."""
    if isinstance(lora_id, bool) or not isinstance(lora_id, int | str):
        raise TypeError(f"lora_id must be an int or an adapter name, got {type(lora_id).__name__}")
    if isinstance(lora_id, int):
        if lora_id < 0:
            raise ValueError(f"lora_id must be >= 0, got {lora_id}")
        return f"lora{lora_id}"
    return check_adapter_name(lora_id)


class LoRARLStrategy:
    """Publish adapters produced by an RL loop and keep reward statistics.

    ``target`` is a :class:`CheckpointStore`, a store root path, or a
    scheduler with an async ``publish_lora_update(lora_id, src_ckpt_dir,
    metadata) -> version`` (the scheduler API), which receives ``lora_id`` as
    given and must have copied the directory when it returns. File I/O runs
    in a worker thread, never on the event loop.
    """

    def __init__(self, target: CheckpointStore | str | os.PathLike[str] | LoraScheduler):
        if isinstance(target, str | os.PathLike):
            target = CheckpointStore(target)
        if not isinstance(target, CheckpointStore):
            publish = getattr(target, "publish_lora_update", None)
            if not inspect.iscoroutinefunction(publish):
                raise TypeError(
                    f"LoRARLStrategy needs a CheckpointStore, a store path, or a scheduler with an async "
                    f"publish_lora_update(lora_id, src_ckpt_dir, metadata); got {type(target).__name__}"
                )
        self.target: CheckpointStore | LoraScheduler = target
        self._all = RewardStats()
        self._per_lora: dict[str, RewardStats] = {}

    async def update_lora_weights(
        self,
        lora_id: int | str,
        new_weights: Any,
        reward: float,
        metadata: Mapping[str, Any] | None = None,
    ) -> str:
        """Publish ``new_weights`` as the next version of adapter ``lora<lora_id>``; return the version.

        ``new_weights``: a PEFT model (its active adapter is saved), a
        ``(state_dict, config)`` pair or ``{"state_dict": ..., "config": ...}``
        (a state dict as ``peft.get_peft_model_state_dict`` returns it, and a
        ``LoraConfig`` or an ``adapter_config.json`` dict), or a PEFT adapter
        directory. ``reward`` and ``metadata`` go into the version's metadata
        (``reward`` wins over a ``"reward"`` entry of ``metadata``). A model is
        saved in a worker thread: do not step its optimizer until this returns.
        """
        name = adapter_name(lora_id)
        if isinstance(reward, bool) or not isinstance(reward, int | float) or not math.isfinite(reward):
            raise ValueError(f"reward must be a finite number, got {reward!r}")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
        full_metadata = {**(metadata or {}), "reward": float(reward)}
        form = _weights_form(new_weights)
        source, temp_dir = await asyncio.to_thread(_materialise, form, new_weights)
        try:
            if isinstance(self.target, CheckpointStore):
                version = await asyncio.to_thread(self.target.publish, name, source, full_metadata)
            else:
                version = await self.target.publish_lora_update(
                    lora_id=lora_id, src_ckpt_dir=str(source), metadata=full_metadata
                )
        finally:
            if temp_dir is not None:
                await asyncio.to_thread(shutil.rmtree, temp_dir, True)
        for stats in (self._all, self._per_lora.setdefault(name, RewardStats())):
            stats.rewards.append(float(reward))
            stats.last_version = version
        return version

    async def get_training_stats(self) -> dict[str, Any]:
        """``{"total_updates", "reward_stats": {"avg", "max", "min", "last", "count"}, "per_lora": {...}}``.

        ``reward_stats`` covers every adapter (``last`` is the latest update of
        any); ``per_lora`` has the same figures per adapter name plus its
        ``last_version``. Only successful updates count.
        """
        return {
            "total_updates": len(self._all.rewards),
            "reward_stats": self._all.summary(),
            "per_lora": {
                name: {**stats.summary(), "last_version": stats.last_version} for name, stats in self._per_lora.items()
            },
        }


def _weights_form(new_weights: Any) -> str:
    """Which accepted form ``new_weights`` is, checked before any I/O."""
    if isinstance(new_weights, str | os.PathLike):
        return "directory"
    # A PeftModel (not a transformers model with an adapter attached, whose active_adapter is a method).
    if hasattr(new_weights, "peft_config") and isinstance(getattr(new_weights, "active_adapter", None), str):
        return "peft_model"
    if isinstance(new_weights, tuple) and len(new_weights) == 2:
        return "state_dict"
    if isinstance(new_weights, Mapping):
        if "state_dict" not in new_weights:
            keys = ", ".join(sorted(map(str, new_weights)))
            raise ValueError(
                f"new_weights is a dict of settings ({keys}) without weights: hyper-parameters such as rank, alpha, "
                f"dropout, learning rate or target modules are not an adapter; {_WHAT_TO_PASS}"
            )
        if new_weights.get("config") is None:
            raise ValueError("new_weights has a 'state_dict' but no 'config': add the LoraConfig (or its dict)")
        return "state_dict"
    raise TypeError(f"new_weights cannot be a {type(new_weights).__name__}: {_WHAT_TO_PASS}")


def _materialise(form: str, new_weights: Any) -> tuple[Path, Path | None]:
    """A validated PEFT directory holding ``new_weights``, and the temp dir to delete afterwards (if any)."""
    if form == "directory":
        source = Path(new_weights)
        if not source.is_dir():
            raise NotFoundError(f"new_weights: {source} is not a directory")
        validate_checkpoint_dir(source)
        return source, None
    temp_dir = Path(tempfile.mkdtemp(prefix="lora-rl-"))
    try:
        if form == "peft_model":
            name = new_weights.active_adapter
            new_weights.save_pretrained(temp_dir, selected_adapters=[name], safe_serialization=True)
            # PEFT saves any adapter other than "default" into a sub-folder named after it.
            source = temp_dir if name == "default" else temp_dir / name
        else:
            state_dict, config = (
                new_weights if isinstance(new_weights, tuple) else (new_weights["state_dict"], new_weights["config"])
            )
            _write_adapter(state_dict, config, temp_dir)
            source = temp_dir
        validate_checkpoint_dir(source)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return source, temp_dir


def _write_adapter(state_dict: Any, config: Any, directory: Path) -> None:
    import torch
    from safetensors.torch import save_file

    if not isinstance(state_dict, Mapping) or not state_dict:
        raise ValueError(f"the state dict must be a non-empty dict of tensors, got {type(state_dict).__name__}")
    tensors = {}
    for key, tensor in state_dict.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise ValueError(f"the state dict must map names to tensors; {key!r} maps to a {type(tensor).__name__}")
        if _KEY_WITH_ADAPTER_NAME.fullmatch(key):
            raise ValueError(
                f"state dict key {key!r} still carries the adapter name: pass peft.get_peft_model_state_dict(model)"
            )
        tensors[key] = tensor.detach().to("cpu").contiguous()
    if hasattr(config, "save_pretrained"):
        config.save_pretrained(directory)  # a PEFT config writes adapter_config.json itself
    elif isinstance(config, Mapping):
        try:
            # LoraConfig.to_dict() keeps target_modules as a set.
            text = json.dumps(dict(config), indent=2, default=_sorted_set)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"the adapter config dict is not JSON-serialisable: {exc}") from None
        (directory / CONFIG_FILE).write_text(text)
    else:
        raise TypeError(f"the adapter config must be a LoraConfig or a dict, got {type(config).__name__}")
    save_file(tensors, directory / SAFETENSORS_FILE, metadata={"format": "pt"})


def _sorted_set(value: object) -> list[Any]:
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")
