"""Every private vLLM symbol the plugin relies on, and a check of them against a vLLM.

vLLM has no stable API for what the plugin does (worker LoRA managers, the
serving routing table, the weight-transfer engines), so each class, method,
attribute and call signature the plugin touches is listed in :data:`SYMBOLS`,
and the differences between supported releases live here too (the functions
at the end), not in version checks spread across files.

One checker, two back-ends:

* **live**: :func:`check_installed`, run by the plugin's ``register()`` before
  any hook is installed. It imports nothing: symbols of modules already loaded
  are inspected, the others read from the installed source. On a mismatch the
  plugin logs one error and does not activate: the engine serves on without it,
  rather than failing in the middle of a swap later.
* **source**: :func:`check_source` parses the files of an unpacked vLLM tree
  (a wheel, without its dependencies) and never imports them, so a release that
  cannot be installed here (other torch, CUDA only) is checked all the same::

      python -m vllm_lora_hotswap.compat.vllm_symbols --source vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl
      make compat VLLM=0.33.0          # downloads that wheel (no dependencies) and checks it
      make compat VLLM_SOURCE=DIR      # an unpacked tree
"""

from __future__ import annotations

import argparse
import ast
import inspect
import operator
import re
import sys
import textwrap
import zipfile
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any

from .. import SUPPORTED_VLLM

# Releases whose weight-transfer base has the 0.33 WeightSource API
# (``metadata`` a property, ``iter_full()``/``iter_local()`` instead of ``__iter__``).
WEIGHT_SOURCE_V2 = ">=0.33"
# Releases with the reload lifecycle (``start_reload``/``finish_reload``, following
# ``VLLM_RELOAD_MODE``), the worker's incomplete-update flag and KV-cache lending.
RELOAD_LIFECYCLE = ">=0.34"


@dataclass(frozen=True)
class Symbol:
    """``module`` and dotted ``name`` (``Class.member``) of one thing the plugin uses.

    ``kind``: ``class``, ``function``, ``method``, ``property`` or ``attribute``
    (set on the instance in a method, declared on the class, or a property).
    ``params``: parameter names the plugin passes (by position or keyword); each
    must exist in the signature. ``versions``: the releases it applies to (a
    specifier; empty for every supported release). ``imports_at_call``: a dotted
    ``module.name`` the function must import inside its body, when called, so that
    the plugin's replacement of that module attribute is what it calls (an import
    at module level would bind vLLM's original before the plugin loads).
    """

    module: str
    name: str
    kind: str
    params: tuple[str, ...] = ()
    versions: str = ""
    imports_at_call: str = ""

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


def _s(module: str, name: str, kind: str, *params: str, versions: str = "", imports_at_call: str = "") -> Symbol:
    return Symbol(module, name, kind, params, versions, imports_at_call)


_WT = "vllm.distributed.weight_transfer"
_LORA_MM = "vllm.lora.model_manager"
_ASYNC = "vllm.v1.engine.async_llm"
_MODELS = "vllm.entrypoints.openai.models.serving"

SYMBOLS: tuple[Symbol, ...] = (
    # plugin.py: our VLLM_HOTSWAP_* variables declared as known
    _s("vllm.envs", "environment_variables", "attribute"),
    # worker.py: staging and installing adapters in each worker
    _s("vllm.lora.request", "LoRARequest", "class", "lora_name", "lora_int_id", "lora_path"),
    _s("vllm.lora.worker_manager", "WorkerLoRAManager._load_adapter", "method", "lora_request"),
    # single_read.py: vLLM's LoRA loader opens the weight file through this module attribute
    _s("vllm.lora.lora_model", "safetensors", "attribute"),
    # idle_spin.py: VLLM_HOTSWAP_IDLE_SPIN
    _s("vllm.distributed.device_communicators.shm_broadcast", "SpinCondition.__init__", "method", "is_reader"),
    _s("vllm.distributed.device_communicators.shm_broadcast", "SpinCondition.busy_loop_s", "attribute"),
    _s("vllm.lora.worker_manager", "WorkerLoRAManager._adapter_manager", "attribute"),
    _s(_LORA_MM, "LRUCacheLoRAModelManager._create_merged_loras_inplace", "method", "lora_model"),
    _s(_LORA_MM, "LRUCacheLoRAModelManager._registered_adapters", "attribute"),
    _s(_LORA_MM, "AdapterLRUCache.pin", "method", "key"),
    _s(_LORA_MM, "LRUCacheLoRAModelManager.add_adapter", "method", "lora"),
    _s(_LORA_MM, "LRUCacheLoRAModelManager.activate_adapter", "method", "lora_id"),
    _s(_LORA_MM, "LRUCacheLoRAModelManager.remove_adapter", "method", "adapter_id"),
    _s(_LORA_MM, "LRUCacheLoRAModelManager.list_adapters", "method"),
    _s(_LORA_MM, "LRUCacheLoRAModelManager.__len__", "method"),
    _s(_LORA_MM, "LRUCacheLoRAModelManager.capacity", "property"),
    _s(_LORA_MM, "LRUCacheLoRAModelManager.lora_slots", "property"),
    _s(_LORA_MM, "LRUCacheLoRAModelManager.packed_modules", "attribute"),
    _s(_LORA_MM, "LRUCacheLoRAModelManager.modules", "attribute"),
    _s(_LORA_MM, "LRUCacheLoRAModelManager.deactivate_adapter", "method", "adapter_id"),
    # the lock around vLLM's own changes to the LoRA manager (worker.py)
    _s("vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager.set_active_adapters", "method", "requests", "mapping"),
    _s("vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager.add_adapter", "method", "lora_request"),
    _s("vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager.remove_adapter", "method", "adapter_id"),
    _s("vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager.pin_adapter", "method", "adapter_id"),
    _s("vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager.remove_all_adapters", "method"),
    # device_slots.py: writing an adapter into a slot off the step, and the mapping flip
    _s(_LORA_MM, "LRUCacheLoRAModelManager.lora_index_to_id", "attribute"),
    _s(_LORA_MM, "LRUCacheLoRAModelManager._active_adapters", "attribute"),
    _s(_LORA_MM, "LRUCacheLoRAModelManager.device", "attribute"),
    _s(_LORA_MM, "LRUCacheLoRAModelManager._get_lora_layer_weights", "method", "lora_model", "module_name"),
    _s(_LORA_MM, "LRUCacheLoRAModelManager._get_module_to_save_weights", "method", "lora_model", "module_name"),
    _s(_LORA_MM, "AdapterLRUCache.deactivate_fn", "attribute"),
    _s(_LORA_MM, "LRUCacheLoRAModelManager._last_mapping", "attribute"),
    _s(_LORA_MM, "AdapterLRUCache.order", "property"),
    _s(_LORA_MM, "AdapterLRUCache.pinned_items", "attribute"),
    _s("vllm.lora.layers.base", "BaseLayerWithLoRA.set_lora", "method", "index", "lora_a", "lora_b"),
    _s("vllm.lora.layers.base", "BaseLayerWithLoRA.reset_lora", "method", "index"),
    _s("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA.reset_lora", "method", "index"),
    _s("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA.lora_a_stacked", "attribute"),
    _s("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA.lora_b_stacked", "attribute"),
    _s("vllm.lora.layers", "ClassificationHeadWithLoRA", "class"),
    _s(
        "vllm.lora.layers.classifier",
        "ClassificationHeadWithLoRA.set_module_to_save",
        "method",
        "index",
        "weight",
        "bias",
    ),
    _s("vllm.lora.layers.classifier", "ClassificationHeadWithLoRA.reset_module_to_save", "method", "index"),
    # rpc.py: the hotswap_* RPCs on every worker, and vLLM's two base-weight paths they wrap
    _s("vllm.v1.worker.worker_base", "WorkerWrapperBase", "class"),
    _s("vllm.v1.worker.worker_base", "WorkerWrapperBase.worker", "attribute"),
    _s("vllm.v1.worker.gpu_worker", "Worker.finish_weight_update", "method"),
    _s("vllm.v1.worker.gpu_worker", "Worker.reload_weights", "method"),
    _s("vllm.v1.worker.gpu_worker", "Worker.model_runner", "attribute"),
    _s("vllm.v1.worker.gpu_worker", "Worker.weight_transfer_engine", "attribute"),
    _s("vllm.v1.worker.gpu_worker", "Worker.rank", "attribute"),
    _s("vllm.v1.worker.gpu_worker", "Worker.vllm_config", "attribute"),
    _s("vllm.config.parallel", "ParallelConfig.data_parallel_rank", "attribute"),
    # weights/gloo.py: this worker's rank in the transfer group
    _s("vllm.config.parallel", "ParallelConfig.data_parallel_index", "attribute"),
    _s("vllm.config.parallel", "ParallelConfig.world_size", "attribute"),
    _s("vllm.config.parallel", "ParallelConfig.rank", "attribute"),
    # the engine-core utility that times an RPC where it holds the engine
    _s("vllm.v1.engine.core", "EngineCore.collective_rpc", "method", "method", "timeout", "args"),
    # weights/gloo.py and weights/trainer.py: the weight-transfer API
    _s(
        f"{_WT}.factory",
        "WeightTransferEngineFactory.register_engine",
        "method",
        "name",
        "module_path_or_cls",
        "class_name",
    ),
    _s(f"{_WT}.factory", "WeightTransferEngineFactory._registry", "attribute"),
    _s(
        f"{_WT}.factory",
        "WeightTransferTrainerFactory.register_engine",
        "method",
        "name",
        "module_path_or_cls",
        "class_name",
    ),
    _s(f"{_WT}.factory", "WeightTransferTrainerFactory._registry", "attribute"),
    _s(f"{_WT}.base", "ParamMeta", "class", "name", "dtype", "shape"),
    _s(f"{_WT}.base", "WeightTransferInitInfo", "class"),
    _s(f"{_WT}.base", "WeightTransferUpdateInfo", "class"),
    _s(f"{_WT}.base", "WeightTransferInitRequest", "class", "init_info"),
    _s(f"{_WT}.base", "WeightTransferUpdateRequest", "class", "update_info"),
    _s(f"{_WT}.base", "WeightTransferEngine", "class"),
    _s(f"{_WT}.base", "WeightTransferEngine.init_info_cls", "attribute"),
    _s(f"{_WT}.base", "WeightTransferEngine.update_info_cls", "attribute"),
    _s(f"{_WT}.base", "WeightTransferEngine.model", "attribute"),
    _s(f"{_WT}.base", "WeightTransferEngine.model_config", "attribute"),
    _s(f"{_WT}.base", "WeightTransferEngine.parallel_config", "attribute"),
    _s(f"{_WT}.base", "WeightTransferEngine.receive_weights", "method", "update_info"),
    _s(f"{_WT}.base", "TrainerInitInfo", "class", "rank"),
    _s(f"{_WT}.base", "TrainerInitInfo.is_sender", "property"),
    _s(f"{_WT}.base", "TrainerWeightTransferEngine.__init__", "method", "client", "source", "is_sender"),
    _s(f"{_WT}.base", "TrainerWeightTransferEngine.source", "attribute"),
    _s(f"{_WT}.base", "VLLMWeightSyncClient", "class"),
    _s(f"{_WT}.base", "WeightSource", "class"),
    _s(f"{_WT}.base", "ModuleSource", "class", "module"),
    _s(f"{_WT}.base", "ModuleSource.metadata", "method", versions="<0.33"),
    _s(f"{_WT}.base", "ModuleSource.__iter__", "method", versions="<0.33"),
    _s(f"{_WT}.base", "ModuleSource.metadata", "property", versions=WEIGHT_SOURCE_V2),
    _s(f"{_WT}.base", "ModuleSource.iter_full", "method", versions=WEIGHT_SOURCE_V2),
    _s(f"{_WT}.nccl_engine", "NCCLTrainerInitInfo", "class", "master_address", "master_port", "world_size", "rank"),
    _s(
        f"{_WT}.nccl_engine", "NCCLTrainerWeightTransferEngine.trainer_init", "method", "init_info", "client", "source"
    ),
    _s(
        "vllm.distributed.utils",
        "stateless_init_torch_distributed_process_group",
        "function",
        "host",
        "port",
        "rank",
        "world_size",
        "backend",
        "timeout",
    ),
    # reload.py: replacing the weights, and the memory that takes
    _s(
        "vllm.model_executor.model_loader.reload", "initialize_layerwise_reload", "function", "model", versions="<0.34"
    ),
    _s("vllm.model_executor.model_loader.reload", "finalize_layerwise_reload", "function", versions="<0.34"),
    _s("vllm.model_executor.model_loader.reload", "start_reload", "function", "model", versions=RELOAD_LIFECYCLE),
    _s(
        "vllm.model_executor.model_loader.reload",
        "finish_reload",
        "function",
        "model",
        "model_config",
        "device",
        versions=RELOAD_LIFECYCLE,
    ),
    _s(
        "vllm.model_executor.model_loader.reload.layerwise",
        "max_layer_reload_bytes",
        "function",
        "model",
        versions=RELOAD_LIFECYCLE,
    ),
    _s(
        "vllm.v1.worker.extensible_kv_cache", "WEIGHT_UPDATE_PEAK_LAYER_FACTOR", "attribute", versions=RELOAD_LIFECYCLE
    ),
    _s(f"{_WT}.base", "WeightTransferEngine.device", "attribute"),
    # rpc.py: a refused update leaves the weights complete, so the worker's flag is cleared
    _s("vllm.v1.worker.gpu_worker", "Worker.update_weights", "method", "update_info"),
    _s("vllm.v1.worker.gpu_worker", "Worker._incomplete_weight_updates", "attribute", versions=RELOAD_LIFECYCLE),
    _s("vllm.v1.worker.gpu_worker", "Worker._weight_update_is_draft", "attribute", versions=RELOAD_LIFECYCLE),
    _s(
        "vllm.model_executor.model_loader.default_loader",
        "DefaultModelLoader.get_all_weights",
        "method",
        "model_config",
        "model",
    ),
    # endpoints.py and server.py: the API server's routing table and engine client
    # endpoints.enable_endpoint_plugin: vLLM's endpoint-plugin loader, wrapped so the plugin is
    # included without VLLM_PLUGINS; it works only while the caller looks the loader up when called
    _s("vllm.plugins", "load_endpoint_plugins", "function", "supported_tasks"),
    _s(
        "vllm.plugins.endpoint_plugins.interface",
        "attach_endpoint_plugins",
        "function",
        "app",
        "supported_tasks",
        imports_at_call="vllm.plugins.load_endpoint_plugins",
    ),
    _s(
        "vllm.plugins.endpoint_plugins.interface",
        "init_endpoint_plugins_state",
        "function",
        "engine_client",
        "state",
        "args",
    ),
    _s("vllm.plugins.endpoint_plugins.interface", "EndpointPlugin.name", "attribute"),
    _s("vllm.plugins.endpoint_plugins.interface", "EndpointPlugin.required_tasks", "attribute"),
    _s("vllm.plugins.endpoint_plugins.interface", "EndpointPlugin.attach_router", "method", "app"),
    _s(
        "vllm.plugins.endpoint_plugins.interface",
        "EndpointPlugin.init_state",
        "method",
        "engine_client",
        "state",
        "args",
    ),
    _s("vllm.entrypoints.serve.engine.protocol", "ModelCard", "class", "id", "root", "parent", "permission"),
    _s("vllm.entrypoints.serve.engine.protocol", "ModelPermission", "class"),
    _s("vllm.entrypoints.serve.engine.serving", "BaseServing._check_model", "method", "request"),
    _s(
        "vllm.entrypoints.serve.engine.serving",
        "BaseServing.create_error_response",
        "method",
        "message",
        "err_type",
        "status_code",
    ),
    _s("vllm.entrypoints.serve.engine.serving", "BaseServing.models", "attribute"),
    _s(_MODELS, "OpenAIServingModels.lora_requests", "attribute"),
    _s(_MODELS, "OpenAIServingModels.lora_id_counter", "attribute"),
    _s(_MODELS, "OpenAIServingModels.registry", "attribute"),
    _s(_MODELS, "OpenAIServingModels.base_model_paths", "attribute"),
    _s(_MODELS, "OpenAIServingModels.show_available_models", "method"),
    _s("vllm.utils.counter", "AtomicCounter.inc", "method", "num"),
    _s(_ASYNC, "AsyncLLM.collective_rpc", "method", "method", "timeout", "args"),
    _s(_ASYNC, "AsyncLLM.engine_core", "attribute"),
    _s("vllm.v1.engine.core_client", "AsyncMPClient.call_utility_all_async", "method", "method"),
    _s(_ASYNC, "AsyncLLM.generate", "method", "prompt", "sampling_params", "request_id", "lora_request"),
    _s(_ASYNC, "AsyncLLM.renderer", "attribute"),
    _s(_ASYNC, "AsyncLLM.output_processor", "attribute"),
    _s(_ASYNC, "AsyncLLM.vllm_config", "attribute"),
    _s(_ASYNC, "AsyncLLM.pause_generation", "method", "mode", "clear_cache"),
    _s(_ASYNC, "AsyncLLM.resume_generation", "method"),
    _s(_ASYNC, "AsyncLLM.abort", "method", "request_id"),  # server.py: samples on a version that failed its probe
    _s(_ASYNC, "AsyncLLM.errored", "property"),
    _s(_ASYNC, "AsyncLLM.reset_prefix_cache", "method", "reset_running_requests"),
    _s(_ASYNC, "AsyncLLM.init_weight_transfer_engine", "method", "request"),
    _s(_ASYNC, "AsyncLLM.start_weight_update", "method"),
    _s(_ASYNC, "AsyncLLM.update_weights", "method", "request"),
    _s(_ASYNC, "AsyncLLM.finish_weight_update", "method", "weight_version"),
    _s(_ASYNC, "AsyncLLM.shutdown_weight_transfer_engine", "method"),
    _s(_ASYNC, "AsyncLLM.get_weight_version", "method"),
    _s("vllm.renderers.base", "BaseRenderer.render_cmpl_async", "method", "prompts"),
    _s("vllm.renderers.base", "BaseRenderer.tokenizer", "attribute"),
    _s("vllm.v1.engine.output_processor", "OutputProcessor.request_states", "attribute"),
    _s("vllm.v1.engine.output_processor", "RequestState.lora_name", "attribute"),
    # lora_metrics.py: vLLM's per-LoRA request counts, by adapter
    _s("vllm.v1.metrics.stats", "LoRARequestStates.update_scheduler_stats", "method", "scheduler_stats"),
    _s("vllm.v1.metrics.stats", "SchedulerStats.running_lora_adapters", "attribute"),
    _s("vllm.v1.metrics.stats", "SchedulerStats.waiting_lora_adapters", "attribute"),
    # What the plugin reads of vLLM's objects, by where it reads it (worker.py, device_slots.py,
    # worker_rpc.py, server.py, offline.py, sample_api.py, endpoints.py, weights/routes.py, weights/gloo.py)
    _s("vllm.v1.worker.lora_model_runner_mixin", "LoRAModelRunnerMixin.lora_manager", "attribute"),
    _s("vllm.config.vllm", "VllmConfig.parallel_config", "attribute"),
    _s("vllm.config.vllm", "VllmConfig.lora_config", "attribute"),
    _s("vllm.config.vllm", "VllmConfig.model_config", "attribute"),
    _s("vllm.config.model", "ModelConfig.model", "attribute"),
    _s("vllm.config.model", "ModelConfig.served_model_name", "attribute"),
    _s("vllm.config.model", "ModelConfig.logprobs_mode", "attribute"),
    _s("vllm.config.lora", "LoRAConfig.max_lora_rank", "attribute"),
    _s("vllm.config.lora", "LoRAConfig.max_loras", "attribute"),
    _s("vllm.config.lora", "LoRAConfig.max_cpu_loras", "attribute"),
    _s("vllm.config.parallel", "ParallelConfig.data_parallel_size", "attribute"),
    _s("vllm.lora.lora_model", "LoRAModel.loras", "attribute"),
    _s("vllm.lora.lora_weights", "LoRALayerWeights.lora_a", "attribute"),
    _s("vllm.lora.lora_weights", "LoRALayerWeights.lora_b", "attribute"),
    _s("vllm.lora.lora_weights", "LoRAFullModuleWeights", "class", "weight", "bias"),
    _s("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA.base_layer", "attribute"),
    _s("vllm.lora.layers.utils", "LoRAMapping", "class", "index_mapping", "prompt_mapping"),
    _s(_LORA_MM, "AdapterLRUCache.pop", "method", "key"),
    # read with getattr and a default: a rename would silently turn the adapter shape check off
    _s("vllm.model_executor.layers.linear", "LinearBase.input_size", "attribute"),
    _s("vllm.model_executor.layers.linear", "LinearBase.output_size", "attribute"),
    _s("vllm.model_executor.layers.linear", "MergedColumnParallelLinear.output_sizes", "attribute"),
    _s("vllm.model_executor.layers.linear", "QKVParallelLinear.output_sizes", "attribute"),
    _s("vllm.model_executor.layers.linear", "QKVParallelLinear.num_kv_head_replicas", "attribute"),
    _s("vllm.v1.engine.core", "EngineCoreProc._handle_client_request", "method"),
    _s("vllm.v1.serial_utils", "run_method", "function", "obj", "method", "args", "kwargs"),
    _s("vllm.tokenizers.protocol", "TokenizerLike.encode", "method", "text", "add_special_tokens"),
    _s("vllm.tokenizers.protocol", "TokenizerLike.bos_token_id", "property"),
    _s("vllm.outputs", "RequestOutput.outputs", "attribute"),
    _s("vllm.outputs", "RequestOutput.prompt_token_ids", "attribute"),
    _s("vllm.outputs", "CompletionOutput.text", "attribute"),
    _s("vllm.outputs", "CompletionOutput.token_ids", "attribute"),
    _s("vllm.outputs", "CompletionOutput.logprobs", "attribute"),
    _s("vllm.outputs", "CompletionOutput.finish_reason", "attribute"),
    _s("vllm.logprobs", "Logprob.logprob", "attribute"),
    _s("vllm.inputs", "TokensPrompt.prompt_token_ids", "attribute"),
    _s("vllm.inputs", "TextPrompt.prompt", "attribute"),
    _s(_MODELS, "OpenAIServingModels.is_base_model", "method", "model_name"),
    _s(_MODELS, "OpenAIModelRegistry.show_available_models", "method"),
    _s("vllm.exceptions", "VLLMValidationError.parameter", "attribute"),
    _s("vllm.entrypoints.serve.engine.protocol", "ModelList.data", "attribute"),
    _s("vllm.entrypoints.openai.models.protocol", "BaseModelPath.name", "attribute"),
    _s("vllm.lora.request", "LoRARequest.base_model_name", "attribute"),
    _s(
        "vllm.entrypoints.launchers.api_server.app_state",
        "init_app_state",
        "function",
        "engine_client",
        "state",
        "args",
    ),
    _s("vllm.entrypoints.launchers.cli_args", "FrontendArgs.host", "attribute", versions="<0.33"),
    _s("vllm.entrypoints.launchers.cli_args", "FrontendArgs.port", "attribute", versions="<0.33"),
    _s("vllm.entrypoints.launchers.cli_args", "FrontendArgs.api_key", "attribute", versions="<0.33"),
    _s("vllm.entrypoints.common.cli_args", "FrontendArgs.host", "attribute", versions=">=0.33"),
    _s("vllm.entrypoints.common.cli_args", "FrontendArgs.port", "attribute", versions=">=0.33"),
    _s("vllm.entrypoints.common.cli_args", "FrontendArgs.api_key", "attribute", versions=">=0.33"),
    _s("vllm.engine.arg_utils", "EngineArgs.weight_transfer_config", "attribute"),
    # weights/gloo.py overrides and calls of the weight-transfer base classes
    _s(f"{_WT}.base", "WeightTransferEngine.__init__", "method"),
    _s(f"{_WT}.base", "WeightTransferEngine.init_transfer_engine", "method", "init_info"),
    _s(f"{_WT}.base", "WeightTransferEngine.start_weight_update", "method"),
    _s(f"{_WT}.base", "WeightTransferEngine.finish_weight_update", "method"),
    _s(f"{_WT}.base", "WeightTransferEngine.shutdown", "method"),
    _s(f"{_WT}.base", "TrainerInitInfo.backend", "attribute"),
    _s(f"{_WT}.base", "TrainerWeightTransferEngine.init_info_cls", "attribute"),
    _s(f"{_WT}.base", "TrainerWeightTransferEngine.trainer_init", "method", "init_info", "client", "source"),
    _s(f"{_WT}.base", "TrainerWeightTransferEngine.send_weights", "method"),
    _s(f"{_WT}.base", "TrainerWeightTransferEngine.shutdown", "method"),
    _s(f"{_WT}.base", "TrainerWeightTransferEngine.is_sender", "attribute"),
    _s(f"{_WT}.base", "TrainerWeightTransferEngine.client", "attribute"),
    _s(f"{_WT}.base", "VLLMWeightSyncClient.init_weight_transfer_engine", "method", "init_info"),
    _s(f"{_WT}.base", "VLLMWeightSyncClient.start_weight_update", "method"),
    _s(f"{_WT}.base", "VLLMWeightSyncClient.update_weights", "method", "update_info"),
    _s(f"{_WT}.base", "VLLMWeightSyncClient.finish_weight_update", "method", "weight_version"),
    _s(
        "vllm.model_executor.model_loader.reload.layerwise",
        "finalize_layerwise_processing",
        "function",
        "model",
        "model_config",
        versions="<0.34",
    ),
    # weights/trainer.py: vLLM's own NCCL trainer engine
    _s(f"{_WT}.nccl_engine", "NCCLTrainerWeightTransferEngine.send_weights", "method"),
    _s(f"{_WT}.nccl_engine", "NCCLTrainerWeightTransferEngine.shutdown", "method"),
    # fleet/launcher.py and cli.py start `python -m vllm.entrypoints.openai.api_server`
    _s("vllm.entrypoints.openai.api_server", "run_server", "function"),
    # offline.py: vllm.LLM
    _s("vllm.entrypoints.llm", "LLM.collective_rpc", "method", "method", "args"),
    _s("vllm.entrypoints.llm", "LLM.generate", "method", "prompts", "sampling_params", "use_tqdm", "lora_request"),
    _s("vllm.entrypoints.llm", "LLM.llm_engine", "attribute"),
    _s("vllm.v1.engine.llm_engine", "LLMEngine.vllm_config", "attribute"),
    _s("vllm.v1.engine.llm_engine", "LLMEngine.output_processor", "attribute"),
    _s("vllm.v1.engine.llm_engine", "LLMEngine.tokenizer", "property"),
    _s(
        "vllm.sampling_params",
        "SamplingParams",
        "class",
        "max_tokens",
        "temperature",
        "ignore_eos",
        "logprobs",
        "detokenize",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "seed",
        "stop",
    ),
)


class Mismatch(Exception):
    """One symbol the plugin relies on is missing or has changed in this vLLM."""

    def __init__(self, symbol: Symbol, problem: str):
        super().__init__(f"{symbol}: {problem}")


def supported(version: str) -> bool:
    return version_in(version, ",".join(SUPPORTED_VLLM))


def version_in(version: str, spec: str) -> bool:
    """Whether ``version`` meets ``spec`` (``">=0.32.0,<0.34"``). Only the release
    numbers count (``0.32.0+cpu`` and ``0.33.0rc1`` are 0.32.0 and 0.33.0); written
    out so the source check runs on a bare Python, without ``packaging``."""
    release = release_numbers(version)
    if release is None:
        return False
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        op = clause[: len(clause) - len(clause.lstrip("<>=!"))]
        bound = release_numbers(clause[len(op) :])
        if bound is None or op not in _OPS:
            raise ValueError(f"unsupported version specifier {clause!r}")
        width = max(len(release), len(bound))
        if not _OPS[op](release + (0,) * (width - len(release)), bound + (0,) * (width - len(bound))):
            return False
    return True


_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq, "!=": operator.ne}


def release_numbers(version: str) -> tuple[int, ...] | None:
    """The release numbers of ``version`` (``"0.34.0+cu130"`` -> ``(0, 34, 0)``); None if it has none."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def symbols_for(version: str) -> list[Symbol]:
    return [s for s in SYMBOLS if version_in(version, s.versions)]


def report(version: str, problems: list[Mismatch]) -> str | None:
    """The one error line for a vLLM, or None when the plugin can run on it."""
    where = f"vllm-lora-hotswap supports vLLM {','.join(SUPPORTED_VLLM)}"
    if not supported(version):
        return f"{where}; found vLLM {version}"
    if problems:
        names = "; ".join(str(p) for p in problems)
        return f"{where}; vLLM {version} differs in what the plugin relies on: {names}"
    return None


# -- the live back-end ------------------------------------------------------------------


def installed_version() -> str:
    import vllm

    return vllm.__version__


def check_installed() -> str | None:
    """Check the installed vLLM; the one error line, or None when it matches.

    A symbol whose module this process has already imported is inspected; any other
    is read from the installed source instead of being imported (the API server
    need not load the worker's modules, nor the worker the server's, to check them)."""
    import vllm

    version = vllm.__version__
    if not supported(version):
        return report(version, [])
    installed = SourceTree(Path(vllm.__file__).parent)
    problems = []
    for symbol in symbols_for(version):
        try:
            if symbol.module in sys.modules:
                _check_live(symbol)
            else:
                installed.check(symbol)
        except Mismatch as exc:
            problems.append(exc)
    return report(version, problems)


def _check_live(symbol: Symbol) -> None:
    owner: Any = sys.modules[symbol.module]
    *path, last = symbol.name.split(".")
    for part in path:
        owner = getattr(owner, part, None)
        if owner is None:
            raise Mismatch(symbol, f"{part} does not exist")
    if symbol.kind == "attribute" and inspect.isclass(owner):
        if not hasattr(owner, last) and not any(_assigns(cls, last) for cls in inspect.getmro(owner)):
            raise Mismatch(symbol, "no such attribute")
        return
    if symbol.kind == "property":
        static = inspect.getattr_static(owner, last, None)
        if not isinstance(static, (property, cached_property)):
            raise Mismatch(symbol, "is not a property" if static is not None else "does not exist")
        return
    target = inspect.getattr_static(owner, last, None) if inspect.isclass(owner) else getattr(owner, last, None)
    if target is None:
        raise Mismatch(symbol, "does not exist")
    if symbol.kind == "class" and not inspect.isclass(target):
        raise Mismatch(symbol, "is not a class")
    if symbol.kind in ("method", "function"):
        target = getattr(target, "__func__", target)  # staticmethod / classmethod
        if not callable(target) or inspect.isclass(target):
            raise Mismatch(symbol, f"is not a {symbol.kind}")
    if symbol.params:
        try:
            parameters = inspect.signature(target).parameters
        except (TypeError, ValueError):
            raise Mismatch(symbol, "has no inspectable signature") from None
        _check_params(symbol, list(parameters))
    if symbol.imports_at_call:
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(target)))
        except (OSError, TypeError, SyntaxError):
            raise Mismatch(symbol, "has no readable source") from None
        _check_imports_at_call(symbol, tree.body[0] if tree.body else tree)


def _check_imports_at_call(symbol: Symbol, function: ast.AST) -> None:
    module, _, name = symbol.imports_at_call.rpartition(".")
    for node in ast.walk(function):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module == module:
            if any(alias.name == name for alias in node.names):
                return
    raise Mismatch(
        symbol, f"no longer imports {symbol.imports_at_call} when called, so the plugin's wrapper of it is bypassed"
    )


def _check_params(symbol: Symbol, names: list[str]) -> None:
    missing = [p for p in symbol.params if p not in names]
    if missing:
        raise Mismatch(symbol, f"takes ({', '.join(n for n in names if n != 'self')}), not {', '.join(missing)}")


@cache
def _assigns(cls: type, name: str) -> bool:
    """Whether ``cls`` declares ``name`` (an annotation without a value) or a method
    sets ``self.<name>``: such attributes exist only on instances, and the start-up
    check has none."""
    if cls.__module__ == "builtins":
        return False
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return False
    if not tree.body or not isinstance(tree.body[0], ast.ClassDef):
        return False
    cls_node = tree.body[0]
    declared = {n.target.id for n in cls_node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    return name in declared or name in _self_assignments(cls_node)


def _self_assignments(node: ast.AST) -> set[str]:
    names = set()
    for sub in ast.walk(node):
        targets = (
            sub.targets if isinstance(sub, ast.Assign) else [sub.target] if isinstance(sub, ast.AnnAssign) else []
        )
        for target in targets:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                names.add(target.attr)
    return names


# -- the source back-end (AST; nothing is imported) ------------------------------------


class SourceTree:
    """An unpacked vLLM (the directory holding the ``vllm`` package, or the package
    itself) or a vLLM wheel, read in place."""

    def __init__(self, root: str | Path):
        root = Path(root)
        self._trees: dict[str, ast.Module | None] = {}
        if root.suffix == ".whl":
            self._wheel: zipfile.ZipFile | None = zipfile.ZipFile(root)
            self._names = set(self._wheel.namelist())
            self.package = Path("vllm")
        else:
            self._wheel = None
            self.package = root if (root / "_version.py").exists() or root.name == "vllm" else root / "vllm"
        if self._read(self.package / "__init__.py") is None:
            raise FileNotFoundError(f"no vllm package in {root} (expected {self.package}/__init__.py)")

    def _read(self, path: Path) -> str | None:
        if self._wheel is None:
            return path.read_text() if path.is_file() else None
        return self._wheel.read(path.as_posix()).decode() if path.as_posix() in self._names else None

    @cached_property
    def version(self) -> str:
        path = self.package / "_version.py"
        text = self._read(path)
        for node in ast.parse(text).body if text else []:  # __version__ = version = '0.33.0'
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
                if isinstance(node.value, ast.Constant):
                    return str(node.value.value)
        raise ValueError(f"cannot read vLLM's version from {path}")

    def module(self, dotted: str) -> ast.Module | None:
        """vLLM's module ``dotted``, parsed; None for a missing one or another package's."""
        if dotted not in self._trees:
            parts = dotted.split(".")
            base = self.package.joinpath(*parts[1:])
            tree = None
            for path in (base.with_suffix(".py"), base / "__init__.py") if parts[0] == "vllm" else ():
                text = self._read(path)
                if text is not None:
                    tree = ast.parse(text, str(path))
                    # relative imports in a package's __init__ start from the package
                    tree._is_package = path.name == "__init__.py"  # type: ignore[attr-defined]
                    break
            self._trees[dotted] = tree
        return self._trees[dotted]

    def lookup(
        self, dotted: str, name: str, seen: frozenset[tuple[str, str]] = frozenset()
    ) -> tuple[str, ast.AST] | None:
        """The definition of ``name`` in module ``dotted``, following ``from x import name``."""
        if (dotted, name) in seen:
            return None
        seen = seen | {(dotted, name)}
        tree = self.module(dotted)
        if tree is None:
            return None
        found: tuple[str, ast.AST] | None = None
        for node in _top_level(tree):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                found = (dotted, node)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    found = found or (dotted, node)
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name and found is None:
                        found = self.lookup(_absolute(dotted, node, tree), alias.name, seen)
            elif isinstance(node, ast.Import):  # import safetensors: the module is an attribute
                if any((alias.asname or alias.name.split(".")[0]) == name for alias in node.names):
                    found = found or (dotted, node)
        return found

    def class_member(self, module: str, cls: ast.ClassDef, name: str, depth: int = 0) -> ast.AST | str | None:
        """``name`` in ``cls`` or its bases: a definition node, ``"instance"`` for a
        ``self.name = ...`` assignment, or None."""
        for node in cls.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                return node
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
                return node
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                return node
        if name in _self_assignments(cls):
            return "instance"
        if depth > 10:
            return None
        for base in cls.bases:
            base = base.value if isinstance(base, ast.Subscript) else base  # Generic[...]
            if isinstance(base, ast.Name):
                hit = self.lookup(module, base.id)
            elif isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name):
                hit = self._attribute_base(module, base)
            else:
                hit = None
            if hit is not None and isinstance(hit[1], ast.ClassDef):
                member = self.class_member(hit[0], hit[1], name, depth + 1)
                if member is not None:
                    return member
        return None

    def _attribute_base(self, module: str, base: ast.Attribute) -> tuple[str, ast.AST] | None:
        tree = self.module(module)
        assert isinstance(base.value, ast.Name) and tree is not None
        for node in _top_level(tree):  # import vllm.x.y as z; class A(z.B)
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if (alias.asname or alias.name) == base.value.id:
                        return self.lookup(alias.name, base.attr)
        return None

    def check(self, symbol: Symbol) -> None:
        if self.module(symbol.module) is None:
            raise Mismatch(symbol, f"module {symbol.module} does not exist")
        first, *rest = symbol.name.split(".")
        hit = self.lookup(symbol.module, first)
        if hit is None:
            raise Mismatch(symbol, f"{first} does not exist in {symbol.module}")
        module, node = hit
        for part in rest:
            if not isinstance(node, ast.ClassDef):
                raise Mismatch(symbol, f"{first} is not a class")
            member = self.class_member(module, node, part)
            if member is None:
                raise Mismatch(symbol, "does not exist" if symbol.kind != "attribute" else "no such attribute")
            if member == "instance":
                if symbol.kind != "attribute":
                    raise Mismatch(symbol, f"is an instance attribute, not a {symbol.kind}")
                return
            node = member  # type: ignore[assignment]
        self._check_node(symbol, node)

    def _check_node(self, symbol: Symbol, node: ast.AST) -> None:
        is_function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        decorators = {_decorator_name(d) for d in node.decorator_list} if is_function else set()  # type: ignore[union-attr]
        is_property = bool(decorators & {"property", "cached_property"})
        if symbol.kind == "class" and not isinstance(node, ast.ClassDef):
            raise Mismatch(symbol, "is not a class")
        if symbol.kind == "property" and not is_property:
            raise Mismatch(symbol, "is not a property")
        if symbol.kind in ("method", "function") and (not is_function or is_property):
            raise Mismatch(symbol, f"is not a {symbol.kind}" + (" (it is a property)" if is_property else ""))
        if symbol.params:
            self._check_node_params(symbol, node)
        if symbol.imports_at_call:
            if not is_function:
                raise Mismatch(symbol, "is not a function")
            _check_imports_at_call(symbol, node)

    def _check_node_params(self, symbol: Symbol, node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
        elif isinstance(node, ast.ClassDef):  # dataclass, msgspec or pydantic fields, or __init__
            names = [n.target.id for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
            init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
            if init is not None:
                names += [x.arg for x in (*init.args.args, *init.args.kwonlyargs)]
            names += self._inherited_fields(symbol.module, node)
        else:
            raise Mismatch(symbol, "has no signature")
        _check_params(symbol, names)

    def _inherited_fields(self, module: str, node: ast.ClassDef, depth: int = 0) -> list[str]:
        names: list[str] = []
        for base in node.bases:
            base = base.value if isinstance(base, ast.Subscript) else base
            hit = self.lookup(module, base.id) if isinstance(base, ast.Name) else None
            if hit is not None and isinstance(hit[1], ast.ClassDef) and depth < 10:
                cls = hit[1]
                names += [
                    n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
                ]
                names += self._inherited_fields(hit[0], cls, depth + 1)
        return names


def _top_level(tree: ast.Module) -> list[ast.stmt]:
    """Module-level statements, including those under ``if``/``try`` (TYPE_CHECKING, fallbacks)."""
    out: list[ast.stmt] = []
    stack = list(tree.body)
    while stack:
        node = stack.pop(0)
        if isinstance(node, (ast.If, ast.Try)):
            stack[:0] = [
                *node.body,
                *getattr(node, "orelse", []),
                *(h for t in getattr(node, "handlers", []) for h in t.body),
            ]
        else:
            out.append(node)
    return out


def _absolute(dotted: str, node: ast.ImportFrom, tree: ast.Module) -> str:
    if not node.level:
        return node.module or ""
    package = dotted.split(".")
    base = package if getattr(tree, "_is_package", False) else package[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join([*base, *([node.module] if node.module else [])])


def _decorator_name(node: ast.expr) -> str:
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def check_source(root: str | Path) -> tuple[str, str | None]:
    """(vLLM version, the one error line or None) for an unpacked vLLM tree or a wheel."""
    tree = SourceTree(root)
    version = tree.version
    return version, report(version, source_mismatches(tree, version))


def source_mismatches(tree: SourceTree, version: str) -> list[Mismatch]:
    """Every symbol that applies to ``version`` and differs in ``tree``, whether or not
    ``version`` is supported (a newer release is checked all the same: :mod:`.release_check`)."""
    problems = []
    for symbol in symbols_for(version):
        try:
            tree.check(symbol)
        except Mismatch as exc:
            problems.append(exc)
    return problems


# -- what differs between supported releases --------------------------------------------


@cache
def weight_source_v2() -> bool:
    """Whether the installed vLLM has the 0.33 ``WeightSource`` API."""
    return version_in(installed_version(), WEIGHT_SOURCE_V2)


@cache
def reload_lifecycle() -> bool:
    """Whether the installed vLLM has ``start_reload``/``finish_reload`` (0.34)."""
    return version_in(installed_version(), RELOAD_LIFECYCLE)


def source_metadata(source: Any) -> list[Any]:
    """``ParamMeta`` of every parameter of a ``WeightSource``, on either API."""
    return list(source.metadata) if weight_source_v2() else source.metadata()


def source_tensors(source: Any) -> Any:
    """The ``(name, full tensor)`` pairs of a ``WeightSource``, in metadata order, on either API."""
    return source.iter_full() if weight_source_v2() else iter(source)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_lora_hotswap.compat.vllm_symbols",
        description="Check every private vLLM symbol the plugin relies on against a vLLM.",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--source", help="an unpacked vLLM tree or a vLLM wheel (parsed, never imported)")
    where.add_argument("--installed", action="store_true", help="the vLLM installed here (imported)")
    args = parser.parse_args(argv)
    if args.installed:
        version, error = installed_version(), check_installed()
    else:
        try:
            version, error = check_source(args.source)
        except (FileNotFoundError, ValueError, zipfile.BadZipFile) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if error is not None:
        print(f"FAIL vLLM {version}: {error}", file=sys.stderr)
        return 1
    print(f"OK vLLM {version}: all {len(symbols_for(version))} symbols the plugin relies on match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
