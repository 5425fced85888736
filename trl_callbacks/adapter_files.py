"""Saving the adapter being trained: PEFT's two files, without PEFT's model card.

Why: ``PeftModel.save_pretrained`` writes ``adapter_config.json``,
``adapter_model.safetensors`` and a ``README.md`` model card, and the card is
rendered from a Jinja template that huggingface_hub compiles anew on every
call. A store version keeps the config and the weights only (the commit drops
anything else), and on the RL path the callback saves at every step, so the
card is pure cost on the critical path of every policy sync: most of the save
for a small adapter, a third of it for a 10 MB one (``python -m
benchmarks.publish_path trainer``, the ``direct`` and ``lean`` paths).

How: the same steps as ``save_pretrained`` for one adapter, minus the card.
PEFT's own ``get_peft_model_state_dict`` picks the tensors (embedding layers
and ``modules_to_save`` as PEFT decides), aliased tensors are cloned and
non-contiguous ones made contiguous (safetensors refuses both), safetensors
writes them with PEFT's ``{"format": "pt"}`` metadata (into a store's staged
version, ``StagedVersion.write_weights`` writes the same file straight from the
tensors' memory while it hashes them, so the commit reads nothing back), and
the config is written by PEFT's ``PeftConfig.save_pretrained`` with the fields
PEFT sets on save (``inference_mode`` true, ``base_model_name_or_path`` filled
in, the auto-mapping of a config without a task type). The files load with
``PeftModel.from_pretrained`` and vLLM as PEFT's own do. Anything this module
does not know how to save the PEFT way (a ``.bin``-only adapter type, a weight
conversion) is not its job: it saves LoRA adapters, as the callback publishes.
"""

from __future__ import annotations

import copy
import weakref
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import save_file

from vllm_lora_hotswap.store.checkpoint import SAFETENSORS_FILE, TORCH_DTYPE_NAMES
from vllm_lora_hotswap.store.safetensors_layout import TensorBytes
from vllm_lora_hotswap.store.staged import StagedVersion

_FORMAT = {"format": "pt"}  # the metadata PEFT's save_pretrained writes
_SAFETENSORS_DTYPES = {getattr(torch, torch_name): name for name, torch_name in TORCH_DTYPE_NAMES.items()}


def save_adapter(model: PeftModel, target: str | Path | StagedVersion, adapter_name: str | None = None) -> None:
    """Write ``adapter_name`` (default: the active adapter) of ``model`` as
    ``adapter_config.json`` and ``adapter_model.safetensors`` into ``target``: a directory, or
    a store's staged version (its weights are then hashed and checked as they are written).

    Example: ``save_adapter(model, staged)`` inside ``with store.open_version("policy") as
    staged:``, which is what ``HotSwapCallback`` does at each publication.
    """
    name = adapter_name or model.active_adapter
    if name not in model.peft_config:
        raise ValueError(f"{name!r} is not an adapter of this model (it has {sorted(model.peft_config)})")
    tensors = _unaliased(_ADAPTER_KEYS.state_dict(model, name))
    directory = target.path if isinstance(target, StagedVersion) else Path(target)
    directory.mkdir(parents=True, exist_ok=True)
    # The config first: an engine told of the weight file (the staged version's on_written hook)
    # builds the adapter ahead from both files.
    _saved_config(model, name).save_pretrained(str(directory), auto_mapping_dict=_auto_mapping(model, name))
    if isinstance(target, StagedVersion):
        target.write_weights({key: _tensor_bytes(key, tensor) for key, tensor in tensors.items()}, _FORMAT)
    else:
        save_file(tensors, directory / SAFETENSORS_FILE, metadata=_FORMAT)


class _AdapterKeys:
    """``get_peft_model_state_dict(model, adapter_name=name)``, at the cost of one
    ``named_parameters()`` from the second call on.

    Why: PEFT walks every module of the model to pick an adapter's tensors and name them
    (several milliseconds on a small model, on the critical path of every RL step's publish),
    and its choice follows from the model's structure and the adapter's config alone. How: the
    first call asks PEFT and records which parameter each saved tensor is (same memory, shape
    and strides); a later call with the same parameters (names, shapes, dtypes) and the same
    config takes those parameters by name, as they are now. Any change asks PEFT again; a
    saved tensor that is not a parameter (PEFT built it) makes PEFT answer every time.
    """

    def __init__(self) -> None:
        self._known: weakref.WeakKeyDictionary[PeftModel, dict[str, tuple[Any, dict[str, str] | None]]] = (
            weakref.WeakKeyDictionary()
        )

    def state_dict(self, model: PeftModel, name: str) -> dict[str, torch.Tensor]:
        params = dict(model.named_parameters())
        fingerprint = (
            repr(model.peft_config[name]),
            tuple((key, tuple(param.shape), param.dtype) for key, param in params.items()),
        )
        known = self._known.setdefault(model, {}).get(name)
        if known is not None and known[0] == fingerprint:
            if known[1] is None:  # no mapping for this model: PEFT answers every time
                return get_peft_model_state_dict(model, adapter_name=name)
            return {key: params[param_name].detach() for key, param_name in known[1].items()}
        state = get_peft_model_state_dict(model, adapter_name=name)
        self._known[model][name] = (fingerprint, _parameter_names(state, params))
        return state


def _parameter_names(state: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> dict[str, str] | None:
    """Which parameter each of ``state``'s tensors is, or None if one is not a parameter or two
    parameters look alike (empty ones, as DeepSpeed ZeRO-3 leaves outside a gather)."""

    def identity(tensor: torch.Tensor) -> tuple[Any, ...]:
        return (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())

    by_identity = {identity(param): key for key, param in params.items()}
    if len(by_identity) != len(params) or any(param.numel() == 0 for param in params.values()):
        return None
    names = {key: by_identity.get(identity(tensor)) for key, tensor in state.items()}
    return None if None in names.values() else names  # type: ignore[return-value]


_ADAPTER_KEYS = _AdapterKeys()


def _tensor_bytes(key: str, tensor: torch.Tensor) -> TensorBytes:
    """A CPU tensor's own memory, as the store writes it (a tensor elsewhere is copied to the host)."""
    if tensor.dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"{key}: safetensors cannot store {tensor.dtype}")
    host = tensor.detach().cpu().contiguous()
    return TensorBytes(
        _SAFETENSORS_DTYPES[tensor.dtype], tuple(host.shape), host.reshape(-1).view(torch.uint8).numpy()
    )


def _unaliased(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor contiguous and in storage of its own: safetensors refuses aliases (PEFT's own
    save clones them the same way)."""
    seen: set[tuple[torch.device, int]] = set()
    out = {}
    for key, tensor in state.items():
        tensor = tensor.detach()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        out[key] = tensor.clone() if storage in seen else tensor.contiguous()
        seen.add(storage)
    return out


def _saved_config(model: PeftModel, name: str) -> Any:
    """The adapter's config as ``save_pretrained`` writes it, without touching the live one."""
    config = copy.copy(model.peft_config[name])
    config.inference_mode = True
    if config.base_model_name_or_path is None:
        holder = model.base_model if config.is_prompt_learning else model.base_model.model
        config.base_model_name_or_path = holder.__dict__.get("name_or_path") or None
    return config


def _auto_mapping(model: PeftModel, name: str) -> dict[str, str] | None:
    config = model.peft_config[name]
    if config.task_type is not None:
        return None
    base_class = model._get_base_model_class(is_prompt_tuning=config.is_prompt_learning)
    return {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}
