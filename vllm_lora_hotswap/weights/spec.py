"""What a base-weight update may contain: the engine's checkpoint parameters.

An update names parameters as the checkpoint does (HF names, full shapes), not
as the engine's layers hold them (fused ``qkv_proj``, sharded by tensor
parallelism), so the names, shapes and dtypes the engine accepts are recorded
while it loads its checkpoint (every tensor vLLM's default loader streams into
the model passes by). An update is checked against that record before any
layer is touched: by the trainer's client (``GET /weight_info?parameters=1``)
and again by the receiving workers.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

# name -> (shape, dtype name), per loaded model in this process
_SPECS: weakref.WeakKeyDictionary[Any, dict[str, tuple[tuple[int, ...], str]]] = weakref.WeakKeyDictionary()


def install_recorder() -> None:
    """Record every (name, shape, dtype) the default loader reads from the checkpoint."""
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    original = DefaultModelLoader.get_all_weights
    if getattr(original, "_lora_hotswap", False):
        return

    def get_all_weights(self: Any, model_config: Any, model: Any) -> Any:
        spec = _SPECS.setdefault(model, {})
        for name, tensor in original(self, model_config, model):
            spec[name] = (tuple(tensor.shape), _dtype_name(tensor.dtype))
            yield name, tensor

    get_all_weights._lora_hotswap = True  # type: ignore[attr-defined]
    DefaultModelLoader.get_all_weights = get_all_weights  # type: ignore[method-assign]


def spec_of(model: Any) -> dict[str, tuple[tuple[int, ...], str]] | None:
    """The checkpoint parameters ``model`` was loaded from; None if another loader loaded it."""
    return _SPECS.get(model) or None


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


_FLOATING = {"float64", "float32", "float16", "bfloat16"}


def check_update(params: Iterable[tuple[str, Iterable[int], str]], spec: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first parameter of an update that the engine
    cannot load: an unknown name, another shape, or a dtype that is not a cast away
    (any floating dtype loads into a floating parameter; others must match)."""
    for name, shape, dtype in params:
        shape = tuple(int(d) for d in shape)
        dtype = _dtype_name(dtype)
        expected = spec.get(name)
        if expected is None:
            raise ValueError(f"parameter {name!r} {list(shape)} {dtype}: the engine's model has no such parameter")
        expected_shape, expected_dtype = tuple(expected[0]), expected[1]
        if shape != expected_shape:
            raise ValueError(
                f"parameter {name!r} has shape {list(shape)}, the engine's model expects {list(expected_shape)}"
            )
        if dtype != expected_dtype and not (dtype in _FLOATING and expected_dtype in _FLOATING):
            raise ValueError(f"parameter {name!r} has dtype {dtype}, the engine's model expects {expected_dtype}")
