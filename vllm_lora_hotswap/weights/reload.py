"""Replacing the served model's weights in place, and the memory that takes.

Why: the gloo backend (:mod:`.gloo`) promises an all-or-nothing
update. Everything that can refuse an update (the parameter check, the other
engines' verdicts, the trainer's status byte) does so before any layer is
touched; once layers are being replaced there is no way back, and a failure
ends the worker rather than serving a half-loaded model. Running out of memory
half-way is such a failure, so the memory a reload needs is checked first,
while refusing still costs nothing but the update.

How: vLLM replaces weights layer by layer (or, from 0.34 with
``VLLM_RELOAD_MODE=direct``, in place). From 0.34 ``start_reload`` /
``finish_reload`` choose the mode and set ``weight_update_active()``; before,
the layer-wise pair is called directly (:func:`begin` and :func:`finish` hide
the difference). A layer-wise reload materialises one layer at a time in
checkpoint format and processes it: vLLM budgets
``WEIGHT_UPDATE_PEAK_LAYER_FACTOR`` times the largest layer for that
(``vllm/v1/worker/extensible_kv_cache.py``), and so does :func:`shortfall`.
On 0.34 the worker lends the KV cache's memory to an update when the pause
cleared the cache (the plugin's ``/start_weight_update`` pauses that way), so
the free memory read here is read after that loan. The gloo backend also holds
the whole update in host memory before loading it: on a CPU engine both live
in the same memory.
"""

from __future__ import annotations

import torch

from ..compat.vllm_symbols import reload_lifecycle

# vLLM's own budget for a layer-wise reload, where vLLM does not say (before 0.34).
PEAK_LAYER_FACTOR = 3
GIB = 1 << 30


class NothingLoaded(RuntimeError):
    """An update that ended before any layer was replaced: the previous weights serve on."""


class UpdateRefused(NothingLoaded, ValueError):
    """An update this engine will not take (a parameter it lacks, too little memory)."""


def begin(model: torch.nn.Module) -> None:
    """Start replacing ``model``'s weights, in the mode vLLM is configured for."""
    if reload_lifecycle():
        from vllm.model_executor.model_loader.reload import start_reload

        start_reload(model)
    else:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(model)


def finish(model: torch.nn.Module, model_config: object, device: torch.device) -> None:
    """Complete what :func:`begin` started (processing, and on 0.34 the active flag)."""
    if reload_lifecycle():
        from vllm.model_executor.model_loader.reload import finish_reload

        finish_reload(model, model_config, device)
    else:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(model, model_config)


def largest_layer_bytes(model: torch.nn.Module) -> int:
    """Bytes of the largest layer a reload materialises at once: vLLM's own figure
    where it has one (0.34, checkpoint format), else the largest module's own tensors."""
    if reload_lifecycle():
        from vllm.model_executor.model_loader.reload.layerwise import max_layer_reload_bytes

        measured = max_layer_reload_bytes(model)
        if measured:
            return measured
    sizes = (
        sum(t.numel() * t.element_size() for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))
        for m in model.modules()
    )
    return max(sizes, default=0)


def peak_layer_factor() -> int:
    if reload_lifecycle():
        from vllm.v1.worker.extensible_kv_cache import WEIGHT_UPDATE_PEAK_LAYER_FACTOR

        return int(WEIGHT_UPDATE_PEAK_LAYER_FACTOR)
    return PEAK_LAYER_FACTOR


def free_bytes(device: torch.device) -> int:
    """Memory free for a reload on ``device``: on CUDA what the driver reports plus what
    torch's allocator holds unused (as vLLM counts it); on CPU the host's available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        import psutil  # a vLLM dependency: always there in an engine
    except ImportError:
        return _meminfo_available()
    return int(psutil.virtual_memory().available)


def _meminfo_available() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read the available host memory (/proc/meminfo has no MemAvailable)")


def host_free_bytes() -> int:
    return free_bytes(torch.device("cpu"))


def shortfall(model: torch.nn.Module, device: torch.device, update_bytes: int) -> str | None:
    """Why this engine cannot take an update of ``update_bytes`` (held in host memory,
    then reloaded into ``model`` on ``device``) without running out of memory half-way;
    None when it can. Read before any byte arrives."""
    layer = largest_layer_bytes(model)
    factor = peak_layer_factor()
    hold = f"{_size(update_bytes)} to hold the update"
    reload_text = f"{factor} x its largest layer of {_size(layer)} to reload it layer by layer"
    if device.type == "cpu":  # one memory holds both
        needs = [("host", update_bytes + factor * layer, host_free_bytes, f"{hold} + {reload_text}")]
    else:
        needs = [
            (device.type, factor * layer, lambda: free_bytes(device), reload_text),
            ("host", update_bytes, host_free_bytes, hold),
        ]
    for where, needed, read_free, why in needs:
        free = read_free()
        if free < needed:
            return (
                f"the update needs about {_size(needed)} of free {where} memory ({why}) and {_size(free)} is free. "
                f"{_remedy(device)}"
            )
    return None


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / (1 << 20):.1f} MiB"


def _remedy(device: torch.device) -> str:
    if device.type == "cpu":
        return (
            "Lower VLLM_CPU_KVCACHE_SPACE to leave room for updates, or send smaller updates "
            "(each /update_weights call is loaded whole)."
        )
    return (
        "Start the update with /start_weight_update (it pauses with the KV cache cleared, so vLLM >= 0.34 "
        "lends that memory), leave headroom with --gpu-memory-utilization below 1.0, or send smaller "
        "updates (each /update_weights call is loaded whole)."
    )
