"""Serve a retained version a request pins by name (``adapter@version``), installing it on
demand: shared by the OpenAI-compatible routes and the sampling API."""

from __future__ import annotations

import asyncio
from http import HTTPStatus

from ..pipeline.controller import SwapController
from ..pipeline.engine_api import CheckpointRejected, EngineUnavailable, NoCapacity
from ..store import NotFoundError, StoreError, split_served_name


async def ensure_version(controller: SwapController, model: str) -> tuple[HTTPStatus, str] | None:
    """Install a retained version a request pins; an error (status, message) if it cannot be served."""
    adapter, version = split_served_name(model)
    if version is None or not controller.settings.serves(adapter):
        return None
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, controller.ensure, adapter, version)
    except NotFoundError as exc:
        return HTTPStatus.NOT_FOUND, str(exc)
    except CheckpointRejected as exc:
        return HTTPStatus.BAD_REQUEST, f"{model} cannot be served: {exc.reason}"
    except (NoCapacity, EngineUnavailable) as exc:
        return HTTPStatus.SERVICE_UNAVAILABLE, f"{model} cannot be loaded now: {exc}"
    except StoreError as exc:
        return HTTPStatus.BAD_REQUEST, str(exc)
    return None
