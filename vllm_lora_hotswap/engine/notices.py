"""Two routes that take the polling out of an RL step: a publisher's notice, and a wait for a version.

``POST /v1/lora/notify`` ``{"adapter": "policy", "version": "2025-08-18T10-00-00Z"}``:
a publisher says it committed a version (across nodes no file-system event
arrives, so without it the engine would see the version at its next poll).
The engine only looks: the name goes to the watcher as a hint, and the store,
read and validated as after any event, decides. A forged or stale notice costs
one poll of one adapter; a name this instance does not serve is dropped; the
hints waiting are a bounded set. Answers 202 ``{"accepted": bool}`` at once.
``{"adapter": "policy", "written": {"staging": ID, "sha256": S, "size": N}}`` says
earlier that a weight file was written into ``<adapter>/.staging/ID/``, its
commit to follow: each worker reads it ahead (:mod:`.read_ahead`), and staging
uses those bytes only if the committed ``READY`` records the same sha256 (a
forged one costs each worker one read of the named file).

``GET /v1/lora/wait?adapter=policy&version=V&timeout=30``: answers as soon as
this instance serves ``adapter`` at ``V`` or a later version (version names sort
in publication order), or when ``timeout`` seconds (at most 60) have passed:
``{"adapter", "version", "reached", "sampling", "served_version", "state", "last_error"}``.
With ``&sampling=1`` it also answers once ``adapter@V`` is open to pinned sample
requests while it is probed (``"sampling": true``): a rollout's batch then runs
beside the probe, and ``/api/v1/sample`` answers it after the verdict.
``FleetRollout`` waits on it instead of polling ``/v1/lora/adapters``. It is woken
by the pipeline's own ``updated`` events, so it adds no polling of its own.

Both need the server's ``--api-key`` when it has one, as the plugin's other
control routes do (:func:`..weights.routes.require_api_key`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from ..events import SwapEvent
from ..notify import NOTIFY_PATH, WAIT_PATH
from ..pipeline.controller import SwapController
from ..store import StoreError, check_adapter_name
from ..store.checkpoint import SAFETENSORS_FILE
from ..store.layout import STAGING_DIR
from ..store.names import check_version_name
from ..weights.routes import require_api_key

logger = logging.getLogger("vllm.lora_hotswap")
MAX_WAIT_S = 60.0  # a client that wants longer asks again (proxies cut idle requests)
# An adapter that a caller waited to sample (sampling=1) this recently is on an RL path: its
# next version's probe expects that caller's batch even if the caller's wait has not arrived
# yet. A rollout loop sends that wait only once the trainer's step has ended, often after the
# engine, told by the publisher's notice, has started the probe.
SAMPLED_RECENTLY_S = 600.0

notify_router = APIRouter(dependencies=[Depends(require_api_key)])
wait_router = APIRouter(dependencies=[Depends(require_api_key)])


class Written(BaseModel):
    """A weight file written into ``<adapter>/.staging/<staging>/``, its commit to follow."""

    model_config = ConfigDict(extra="forbid")

    staging: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    size: Annotated[int, Field(gt=0)]


class Notice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: str
    version: str | None = None
    written: Written | None = None


def accept_written(controller: SwapController, adapter: str, written: Written) -> bool:
    """Have the engine read a just-written weight file ahead of its commit; False when it
    cannot (an adapter this instance does not serve, an engine without a stage channel)."""
    read_ahead = getattr(controller.engine, "read_ahead", None)  # absent on offline engines and fakes
    if read_ahead is None or not controller.settings.serves(adapter):
        return False
    # Joined, not resolved (no file-system call on the event loop): the name was checked, the
    # worker opens the file without following a symlink, and only READY's sha256 can make its
    # bytes count.
    path = Path(controller.store.root, adapter, STAGING_DIR, written.staging, SAFETENSORS_FILE)
    return bool(read_ahead(str(path), written.sha256, written.size))


def accept_notice(controller: SwapController, adapter: str, version: str | None) -> bool:
    """Hint the watcher to read ``adapter`` now; False when there is nothing to look at
    (an adapter this instance does not serve, a version it serves already, too many hints)."""
    if not controller.settings.serves(adapter):
        return False
    current = controller.current(adapter)
    if version is not None and current is not None and current.version == version:
        return False
    return controller.watcher.hint([adapter])


def _error(status: HTTPStatus, message: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": status.phrase.replace(" ", ""), "code": status.value}},
        status_code=status.value,
    )


def _controller(request: Request) -> SwapController | None:
    return getattr(request.app.state, "lora_hotswap", None)


@notify_router.post(NOTIFY_PATH)
async def notify(request: Request, notice: Notice) -> JSONResponse:
    """A publisher committed ``adapter@version``: read the store now (see the module docstring)."""
    try:
        check_adapter_name(notice.adapter)
        if notice.version is not None:
            check_version_name(notice.version)
    except StoreError as exc:
        return _error(HTTPStatus.BAD_REQUEST, str(exc))
    if notice.written is not None and notice.version is not None:
        return _error(HTTPStatus.BAD_REQUEST, "a notice says a version was committed or a file written, not both")
    controller = _controller(request)
    if controller is None:
        return _error(HTTPStatus.SERVICE_UNAVAILABLE, "the hot-swap pipeline is not running yet")
    if notice.written is not None:
        accepted = accept_written(controller, notice.adapter, notice.written)
        what = f"weights written for {notice.adapter}"
    else:
        accepted = accept_notice(controller, notice.adapter, notice.version)
        what = f"{notice.adapter}@{notice.version}"
    logger.debug("hot-swap: notice of %s %s", what, "accepted" if accepted else "ignored")
    return JSONResponse({"accepted": accepted}, status_code=HTTPStatus.ACCEPTED)


class ServedWaits:
    """Requests waiting for an adapter to be served at a version, woken by swap events.

    Lives on the API server's event loop; the bus calls :meth:`_on_event` from the
    controller's threads. Waiters are removed when their request ends, whatever the name.
    """

    def __init__(self, controller: SwapController, loop: asyncio.AbstractEventLoop):
        self.controller = controller
        self._loop = loop
        self._waiting: dict[str, set[asyncio.Event]] = {}
        self._sampling: dict[str, int] = {}  # adapter -> callers waiting with sampling=1
        self._sampled_at: dict[str, float] = {}  # adapter -> when a caller last waited with sampling=1
        controller.bus.subscribe(self._on_event)
        listeners = getattr(controller.engine, "gate_listeners", None)  # a served engine's sampling gates
        if listeners is not None:
            listeners.append(self._wake)  # called on the loop

    def _on_event(self, event: SwapEvent) -> None:
        # Always scheduled, even with nobody waiting now: a waiter may be registering.
        try:
            self._loop.call_soon_threadsafe(self._wake, event.adapter)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    def _wake(self, adapter: str) -> bool:
        """Wake ``adapter``'s waiters; whether a caller waits to sample it, or waited to within
        ``SAMPLED_RECENTLY_S`` (its batch for the new version is expected)."""
        for waiter in self._waiting.get(adapter, ()):
            waiter.set()
        recently = time.monotonic() - self._sampled_at.get(adapter, -SAMPLED_RECENTLY_S) < SAMPLED_RECENTLY_S
        return self._sampling.get(adapter, 0) > 0 or recently

    def reached(self, adapter: str, version: str) -> bool:
        current = self.controller.current(adapter)
        return current is not None and current.version >= version

    def open_to_samples(self, adapter: str, version: str) -> bool:
        """``adapter@version`` is being probed and sample requests pinning it may start."""
        gate = getattr(self.controller.engine, "sampling_gate", None)
        return gate is not None and gate(f"{adapter}@{version}") is not None

    async def wait(self, adapter: str, version: str, timeout: float, *, sampling: bool = False) -> bool:
        """Whether ``adapter`` is served at ``version`` or later (with ``sampling``, or open to
        pinned samples while it is probed), waiting up to ``timeout`` s."""
        deadline = time.monotonic() + timeout
        if sampling:
            self._sampling[adapter] = self._sampling.get(adapter, 0) + 1
            self._sampled_at[adapter] = time.monotonic()
        try:
            return await self._wait(adapter, version, deadline, sampling)
        finally:
            if sampling:
                self._sampling[adapter] -= 1
                if not self._sampling[adapter]:
                    del self._sampling[adapter]

    async def _wait(self, adapter: str, version: str, deadline: float, sampling: bool) -> bool:
        while not (self.reached(adapter, version) or (sampling and self.open_to_samples(adapter, version))):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            waiter = asyncio.Event()
            # Registered before awaiting, on the loop: an event emitted after the check above
            # wakes it (its callback runs on this loop, after this registration).
            self._waiting.setdefault(adapter, set()).add(waiter)
            try:
                await asyncio.wait_for(waiter.wait(), remaining)
            except TimeoutError:
                pass
            finally:
                waiters = self._waiting.get(adapter)
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters:
                        del self._waiting[adapter]
        return True


def _waits(request: Request, controller: SwapController) -> ServedWaits:
    waits = getattr(request.app.state, "lora_hotswap_waits", None)
    if waits is None or waits.controller is not controller:  # made on the loop: no race
        waits = request.app.state.lora_hotswap_waits = ServedWaits(controller, asyncio.get_running_loop())
    return waits


@wait_router.get(WAIT_PATH)
async def wait_served(
    request: Request,
    adapter: str,
    version: str,
    timeout: Annotated[float, Query(ge=0)] = 30.0,
    sampling: bool = False,
) -> JSONResponse:
    """Answer once ``adapter`` is served at ``version`` or later, or after ``timeout`` s; with
    ``sampling=1`` also once ``adapter@version`` is open to pinned sample requests while it is
    probed (``"sampling": true``: their answers wait for its verdict; see the sample API)."""
    try:
        check_adapter_name(adapter)
        check_version_name(version)
    except StoreError as exc:
        return _error(HTTPStatus.BAD_REQUEST, str(exc))
    controller = _controller(request)
    if controller is None:
        return _error(HTTPStatus.SERVICE_UNAVAILABLE, "the hot-swap pipeline is not running yet")
    waits = _waits(request, controller)
    reached = await waits.wait(adapter, version, min(timeout, MAX_WAIT_S), sampling=sampling)
    state = controller.slots.adapters.get(adapter)
    body: dict[str, Any] = {
        "adapter": adapter,
        "version": version,
        "reached": reached,
        "sampling": sampling and not waits.reached(adapter, version) and waits.open_to_samples(adapter, version),
        "served_version": state.current.version if state and state.current else None,
        "state": state.state if state else None,
        "last_error": state.last_error if state else None,
    }
    return JSONResponse(body)
