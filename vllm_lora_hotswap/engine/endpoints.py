"""The API-server side: an endpoint plugin that starts the swap pipeline, its
routes, and the two serving hooks that make versions routable.

vLLM loads endpoint plugins only when ``VLLM_PLUGINS`` names them; setting
``VLLM_HOTSWAP_ROOT`` is this plugin's opt-in, so the general plugin adds it
to what ``load_endpoint_plugins`` returns (see :func:`enable_endpoint_plugin`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from ..pipeline.controller import SwapController
from ..settings import HotSwapSettings, load_settings
from ..store import CheckpointStore, split_served_name
from .versions import ensure_version

logger = logging.getLogger("vllm.lora_hotswap")
PLUGIN_NAME = "lora_hotswap"

router = APIRouter()


def _controller(request: Request) -> SwapController:
    return request.app.state.lora_hotswap


@router.get("/v1/lora/adapters")
async def list_adapters(request: Request) -> JSONResponse:
    """This instance's adapters, the version each serves and its last swap."""
    controller = _controller(request)
    record = await asyncio.get_running_loop().run_in_executor(None, controller.status)
    return JSONResponse(record.model_dump(mode="json"))


@router.get("/v1/lora/workers")
async def list_workers(request: Request) -> JSONResponse:
    """What each worker of each engine core holds (data-parallel replicas one after the
    other, tensor-parallel ranks in order): LoRA ids registered and installed, staging
    in progress, staged bytes, ``disk_loads`` (adapters vLLM had to read from the store
    inside a step: 0 unless something went wrong), ``slot_writes`` and ``step_copies``
    (installs whose copy ran while staging, or in the step for want of a free slot);
    ``rpc_held_s``: how long this RPC held the engine core (the cost of any RPC)."""
    engine = _controller(request).engine
    workers, held = await asyncio.get_running_loop().run_in_executor(None, engine.worker_states)
    return JSONResponse({"workers": workers, "rpc_held_s": held})


@router.get("/v1/lora/events")
async def list_events(request: Request, since: int = 0) -> JSONResponse:
    """Swap events after sequence number ``since`` (bounded history). ``started_at``
    changes when the instance restarts (its sequence numbers start again at 1)."""
    controller = _controller(request)
    events = controller.bus.since(since)
    return JSONResponse(
        {
            "instance_id": controller.instance_id,
            "started_at": controller.started_at,
            "events": [e.model_dump(mode="json") for e in events],
        }
    )


class HotSwapEndpoints:
    """``vllm.endpoint_plugins``-style plugin: routes plus the pipeline's start-up."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        from ..weights import routes as weights_api
        from . import notices, sample_api

        app.include_router(router)
        app.include_router(sample_api.router)
        app.include_router(notices.wait_router)
        if load_settings().notices:
            app.include_router(notices.notify_router)
        weights_api.attach(app)

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        if engine_client is None:
            return
        settings = load_settings()
        if getattr(args, "api_server_count", 1) not in (None, 1):
            raise RuntimeError("vllm-lora-hotswap runs its swap pipeline in the API server: use --api-server-count 1")
        from vllm import __version__ as vllm_version

        from ..metrics import HotSwapMetrics
        from .server import ServerEngine

        loop = asyncio.get_running_loop()
        models = state.openai_serving_models
        metrics = HotSwapMetrics()
        engine = ServerEngine(engine_client, models, loop, settings, metrics)
        host = args.host if args.host not in (None, "", "0.0.0.0", "::") else socket.gethostname()
        instance_id = settings.instance_id or f"{socket.gethostname()}:{args.port}"
        assert settings.root is not None
        controller = SwapController(
            CheckpointStore(settings.root),
            engine,
            settings,
            instance_id,
            metrics=metrics,
            url=f"http://{host}:{args.port}",
            vllm_version=vllm_version,
        )
        install_serving_hooks(models, controller, settings)
        state.lora_hotswap = controller
        logger.info("vllm-lora-hotswap: following %s as instance %s", settings.root, instance_id)
        await engine.open_stage_channel()
        if settings.probe:
            await engine.warm_up()
        await loop.run_in_executor(None, controller.start)


def install_serving_hooks(models: Any, controller: SwapController, settings: HotSwapSettings) -> None:
    """Make ``/v1/models`` list adapters by name, ``adapter@version`` routable on demand, and
    requests for an adapter wait for the verdict on a new version being probed."""
    from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelPermission
    from vllm.entrypoints.serve.engine.serving import BaseServing

    models.lora_hotswap = controller

    async def show_available_models() -> Any:
        # By routing name: "lora1", not the engine-side "lora1@<version>";
        # "adapter@version" aliases are not models of their own.
        model_list = await models.registry.show_available_models()
        base = models.base_model_paths[0].name
        for name, lora in sorted(models.lora_requests.items()):
            if "@" not in name:
                model_list.data.append(
                    ModelCard(
                        id=name,
                        root=lora.lora_path,
                        parent=lora.base_model_name or base,
                        permission=[ModelPermission()],
                    )
                )
        return model_list

    models.show_available_models = show_available_models

    if getattr(BaseServing._check_model, "_lora_hotswap", False):
        return
    original_check_model = BaseServing._check_model

    async def _check_model(self: Any, request: Any) -> Any:
        hotswap = getattr(self.models, "lora_hotswap", None)
        model = getattr(request, "model", None)
        if hotswap is not None and model:
            if "@" not in model:
                await hotswap.engine.wait_if_held(model)  # its new version is being probed: wait for the verdict
            elif model in self.models.lora_requests:
                hotswap.touch(*split_served_name(model))  # a pinned version in use is not retired
            else:
                error = await ensure_version(hotswap, model)
                if error is not None:
                    return self.create_error_response(
                        error[1], err_type=error[0].phrase.replace(" ", ""), status_code=error[0]
                    )
        return await original_check_model(self, request)

    _check_model._lora_hotswap = True  # type: ignore[attr-defined]
    BaseServing._check_model = _check_model  # type: ignore[method-assign]


def enable_endpoint_plugin() -> None:
    """Have vLLM's endpoint-plugin loader include this plugin without ``VLLM_PLUGINS``."""
    import vllm.plugins as plugins

    if getattr(plugins.load_endpoint_plugins, "_lora_hotswap", False):
        return
    original = plugins.load_endpoint_plugins

    def load_endpoint_plugins(supported_tasks: Any = None) -> list[Any]:
        loaded = original(supported_tasks)
        if (
            supported_tasks is not None
            and "generate" in supported_tasks
            and not any(getattr(p, "name", None) == PLUGIN_NAME for p in loaded)
        ):
            loaded.append(HotSwapEndpoints())
        return loaded

    load_endpoint_plugins._lora_hotswap = True  # type: ignore[attr-defined]
    plugins.load_endpoint_plugins = load_endpoint_plugins
