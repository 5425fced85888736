"""HTTP control routes for base-weight updates, mounted by the plugin on a plain ``vllm serve``.

vLLM mounts its own only under ``VLLM_SERVER_DEV_MODE=1``, which also opens
``/collective_rpc`` and more; these are just what the weight-sync flow needs,
at the same paths (so vLLM's ``HTTPVLLMWeightSyncClient`` works too). They are
mounted only when the server has ``--weight-transfer-config``, and every one
requires the server's ``--api-key`` (vLLM's own middleware guards only ``/v1``
and a few other prefixes, not these paths).

An update is ``start`` (pause generation as the caller asks: ``abort``,
``wait`` or ``keep``), one or more ``update_weights`` (a failed one resumes
generation: the update is over), then ``finish``, which
puts the served adapters back at once, resets the prefix cache (no KV computed
under the old weights is reused), records the weight version and resumes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from http import HTTPStatus
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

logger = logging.getLogger("vllm.lora_hotswap")
PauseMode = Literal["abort", "wait", "keep"]


def api_key_hashes(args: Any) -> list[bytes]:
    import vllm.envs as envs

    keys = [key for key in (getattr(args, "api_key", None) or [envs.VLLM_API_KEY]) if key]
    return [hashlib.sha256(key.encode()).digest() for key in keys]


def require_api_key(request: Request) -> None:
    hashes: list[bytes] = request.app.state.lora_hotswap_key_hashes
    if not hashes:
        return
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    digest = hashlib.sha256(token.encode()).digest()
    if scheme.lower() != "bearer" or not any(secrets.compare_digest(digest, h) for h in hashes):
        raise HTTPException(
            status_code=HTTPStatus.UNAUTHORIZED, detail="Unauthorized: this route needs the server's API key"
        )


# A healthy engine resumes between two steps; one that died on the way never answers.
RESUME_TIMEOUT_S = 30.0


async def _resume_after_failure(engine: Any) -> None:
    """A failed step ends the update, so generation resumes. The route returns whatever
    happens (the server cannot shut down while a route waits on a dead engine); the
    step's own error is the one reported."""
    if engine.errored:
        return
    try:
        await asyncio.wait_for(engine.resume_generation(), RESUME_TIMEOUT_S)
    except Exception:
        logger.exception("hot-swap: resuming generation after a failed weight update failed")


router = APIRouter(dependencies=[Depends(require_api_key)])


def _engine(request: Request) -> Any:
    return request.app.state.engine_client


async def _guarded(action: str, coro: Any) -> JSONResponse:
    try:
        result = await coro
    except HTTPException:
        raise
    except Exception as exc:  # one clear error, no traceback over HTTP
        logger.exception("hot-swap: %s failed", action)
        return JSONResponse(
            {"error": f"{action} failed: {type(exc).__name__}: {exc}"}, HTTPStatus.INTERNAL_SERVER_ERROR
        )
    return JSONResponse(result or {"status": "ok"})


@router.post("/init_weight_transfer_engine")
async def init_weight_transfer_engine(
    request: Request, init_info: Annotated[dict[str, Any], Body(embed=True)]
) -> JSONResponse:
    from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

    return await _guarded(
        "init_weight_transfer_engine",
        _engine(request).init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info)),
    )


@router.post("/start_weight_update")
async def start_weight_update(request: Request, mode: Annotated[PauseMode, Body(embed=True)] = "wait") -> JSONResponse:
    """Pause generation (``abort`` in-flight requests, ``wait`` for them, or ``keep`` them
    frozen to resume on the new weights), then open the update."""
    engine = _engine(request)

    async def start() -> dict[str, Any]:
        # The cache is cleared: finish resets it anyway (no KV computed under the old
        # weights is reused, kept requests included), and from vLLM 0.34 only a cleared
        # cache is lent to the update's reload, whose memory it may need.
        await engine.pause_generation(mode=mode, clear_cache=True)
        try:
            await engine.start_weight_update()
        except BaseException:
            await _resume_after_failure(engine)
            raise
        return {"status": "started", "mode": mode}

    return await _guarded("start_weight_update", start())


@router.post("/update_weights")
async def update_weights(
    request: Request, update_info: Annotated[dict[str, Any] | list[dict[str, Any]], Body(embed=True)]
) -> JSONResponse:
    """Receive one update. On failure (a refused parameter, a cut-off transfer) the
    workers loaded nothing and the update is over (vLLM closes it): generation resumes."""
    from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

    engine = _engine(request)

    async def update() -> None:
        try:
            await engine.update_weights(WeightTransferUpdateRequest(update_info=update_info))
        except BaseException:
            await _resume_after_failure(engine)
            raise

    return await _guarded("update_weights", update())


@router.post("/finish_weight_update")
async def finish_weight_update(
    request: Request, weight_version: Annotated[str | None, Body(embed=True)] = None
) -> JSONResponse:
    engine = _engine(request)
    controller = getattr(request.app.state, "lora_hotswap", None)

    async def finish() -> dict[str, Any]:
        try:
            await engine.finish_weight_update(weight_version)  # workers re-register adapters here
            # Preempts requests kept across the update, so their KV is recomputed
            # with the new weights rather than reused.
            await engine.reset_prefix_cache(reset_running_requests=True)
        except BaseException:
            await _resume_after_failure(engine)
            raise
        await engine.resume_generation()
        if controller is not None:
            controller.record_weight_version(weight_version)
        return {"status": "finished", "weight_version": weight_version}

    return await _guarded("finish_weight_update", finish())


@router.post("/shutdown_weight_transfer_engine")
async def shutdown_weight_transfer_engine(request: Request) -> JSONResponse:
    return await _guarded("shutdown_weight_transfer_engine", _engine(request).shutdown_weight_transfer_engine())


@router.post("/reset_prefix_cache")
async def reset_prefix_cache(request: Request) -> JSONResponse:
    async def reset() -> dict[str, Any]:
        return {"reset": await _engine(request).reset_prefix_cache()}

    return await _guarded("reset_prefix_cache", reset())


@router.post("/resume")
async def resume(request: Request) -> JSONResponse:
    """Resume generation if an update was abandoned between start and finish."""
    return await _guarded("resume", _engine(request).resume_generation())


@router.get("/weight_info")
async def weight_info(request: Request, parameters: bool = False) -> JSONResponse:
    """The weight version; with ``?parameters=1`` also what an update may contain:
    ``{name: [shape, dtype]}`` as the engine loaded its checkpoint (null if unknown)."""
    engine = _engine(request)

    async def info() -> dict[str, Any]:
        result: dict[str, Any] = {"weight_version": await engine.get_weight_version()}
        if parameters:
            specs = await engine.collective_rpc("hotswap_weight_spec")
            result["parameters"] = next((spec for spec in specs if spec is not None), None)
        return result

    return await _guarded("weight_info", info())


@router.get("/get_world_size")
async def get_world_size(request: Request) -> JSONResponse:
    """Engine ranks of this server (TP × PP × DP): its share of the transfer group."""
    parallel = _engine(request).vllm_config.parallel_config
    return JSONResponse({"world_size": parallel.world_size * parallel.data_parallel_size})


class OpenControlRoutes(RuntimeError):
    """A server would accept weight replacements from anyone who can reach it."""


def attach(app: FastAPI) -> None:
    """Mount the control routes on a server with ``--weight-transfer-config``, and only there.

    Raises:
        OpenControlRoutes: they would listen on a non-loopback address with no API key.
    """
    from ..settings import load_settings

    args = app.state.args
    app.state.lora_hotswap_key_hashes = api_key_hashes(args)  # other routes of the plugin need the key too
    if getattr(args, "weight_transfer_config", None) is None:
        return
    host = getattr(args, "host", None)
    if (
        not app.state.lora_hotswap_key_hashes
        and not _is_loopback(host)
        and not load_settings().control_routes_without_key
    ):
        raise OpenControlRoutes(
            f"vllm-lora-hotswap: --weight-transfer-config mounts routes that replace the model's weights, and this "
            f"server listens on {host or 'every address'} without an API key, so anyone who reaches it could. "
            "Pass --api-key (or set VLLM_API_KEY), or listen on 127.0.0.1; on a trusted network, "
            "VLLM_HOTSWAP_CONTROL_ROUTES_WITHOUT_KEY=1 allows it."
        )
    app.include_router(router)


def _is_loopback(host: str | None) -> bool:
    import ipaddress

    if host in (None, "", "0.0.0.0", "::"):
        return False  # every interface
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, not only this machine
