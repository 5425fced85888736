"""The scheduler API over a fleet that follows the store by itself.

The store is the control plane: publishing or pinning there is what moves the
fleet, and instances converge on their own. The scheduler is a client of the
store and of the instances' HTTP routes, not a single point of failure: stop
it and the fleet keeps following the store. After each change it makes in the
store it notifies the instances (``POST /v1/lora/notify``, best effort, not
awaited), so that instances on other nodes, where no file-system event
arrives, read the store at once instead of at their next poll.

Example (the scheduler API's names)::

    scheduler = create_distributed_lora_scheduler(base_port=8001, num_gpus=8, cpfs_base="/cpfs/lora_ckpts")
    scheduler.on_lora_updated = lambda event: print(event.lora_id, event.timestamp, event.instance_id)
    await scheduler.start()
    timestamp = await scheduler.publish_lora_update(1, "/path/to/peft_out", {"reward": 0.85})
    await scheduler.wait_converged(1, timestamp)
    await scheduler.rollback_lora(1, "2025-08-18T10-00-00Z")
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ..notify import notify_async
from ..store import CheckpointStore, InstanceRecord, NotFoundError, check_adapter_name

logger = logging.getLogger("vllm.lora_hotswap")
Callback = Callable[["LoRAUpdateEvent"], Any | Awaitable[Any]]


@dataclass
class LoRAHotSwapConfig:
    """Per-adapter settings: which name ``lora_id`` is published as, where, and which instance serves it."""

    lora_id: int
    port: int | None = None
    cpfs_root: str | None = None
    adapter_name: str | None = None
    adapter_id: int | None = None  # seed field; vLLM slot ids are assigned by each engine

    @property
    def name(self) -> str:
        return self.adapter_name or f"lora{self.lora_id}"


@dataclass
class LoRAUpdateEvent:
    """One adapter version outcome on one instance (``on_lora_updated`` / ``on_lora_failed``)."""

    lora_id: int | None
    adapter: str
    timestamp: str | None  # the version
    instance_id: str
    metadata: dict[str, Any] = field(default_factory=dict)
    error_message: str | None = None
    phase: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


class DistributedLoRAScheduler:
    def __init__(
        self,
        *,
        base_port: int = 8001,
        num_gpus: int = 8,
        cpfs_base: str | None = None,
        poll_interval: float = 5.0,
        enable_probe: bool = True,
        host: str = "127.0.0.1",
        api_key: str | None = None,
        configs: list[LoRAHotSwapConfig] | None = None,
        fleet: Any = None,
    ):
        self.store = CheckpointStore(_store_root(cpfs_base))
        # A fleet (RayFleet: anything whose urls() lists the live instances) replaces the port range.
        self.fleet = fleet
        self.poll_interval = poll_interval
        self.enable_probe = enable_probe
        self._instance_urls = [f"http://{host}:{base_port + i}" for i in range(num_gpus)]
        self.configs: dict[int, LoRAHotSwapConfig] = {}
        for config in configs or []:
            self.configure(config)
        self.on_lora_updated: Callback | None = None
        self.on_lora_failed: Callback | None = None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(30.0, connect=2.0))
        self._cursors: dict[str, tuple[float, int]] = {}  # url -> (instance started_at, last seq)
        self._task: asyncio.Task[None] | None = None
        self._notices: set[asyncio.Task[Any]] = set()

    @property
    def instance_urls(self) -> list[str]:
        """The instances now: the fleet's live replicas, or the fixed port range."""
        return list(self.fleet.urls()) if self.fleet is not None else self._instance_urls

    @instance_urls.setter
    def instance_urls(self, urls: list[str]) -> None:
        self._instance_urls = list(urls)

    async def _live_urls(self) -> list[str]:
        """:attr:`instance_urls` without blocking the event loop: a fleet's ``urls()`` asks
        Ray and each replica's ``/health``, so it runs in a thread."""
        if self.fleet is None:
            return list(self._instance_urls)
        return list(await asyncio.to_thread(self.fleet.urls))

    # -- naming ------------------------------------------------------------------------
    def configure(self, config: LoRAHotSwapConfig) -> None:
        check_adapter_name(config.name)
        self.configs[config.lora_id] = config

    def adapter_name(self, lora_id: int | str) -> str:
        if isinstance(lora_id, str):
            return check_adapter_name(lora_id)
        config = self.configs.get(lora_id)
        return config.name if config else f"lora{lora_id}"

    def _store_for(self, lora_id: int | str) -> CheckpointStore:
        config = self.configs.get(lora_id) if isinstance(lora_id, int) else None
        return CheckpointStore(config.cpfs_root) if config and config.cpfs_root else self.store

    def _lora_id_of(self, adapter: str) -> int | None:
        for lora_id, config in self.configs.items():
            if config.name == adapter:
                return lora_id
        digits = adapter.removeprefix("lora")
        return int(digits) if adapter.startswith("lora") and digits.isdigit() else None

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Start delivering events: each instance's swaps from now on, once per instance."""
        for url in await self._live_urls():
            batch = await self._events(url, 0)
            if batch is not None:
                self._cursors[url] = (batch["started_at"], max((e["seq"] for e in batch["events"]), default=0))
        self._task = asyncio.create_task(self._watch(), name="lora-scheduler-events")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._notices:  # each is bounded by the notice timeout
            await asyncio.gather(*self._notices, return_exceptions=True)
        await self._http.aclose()

    def _notify(self, adapter: str, version: str | None) -> None:
        """Tell every instance that ``adapter`` changed in the store; never waits, never raises."""

        async def send() -> None:
            await notify_async(self._http, await self._live_urls(), adapter, version)

        task = asyncio.get_running_loop().create_task(send())
        self._notices.add(task)
        task.add_done_callback(self._notices.discard)

    async def _watch(self) -> None:
        interval = min(self.poll_interval, 1.0)
        while True:
            await asyncio.gather(*(self._deliver(url) for url in await self._live_urls()))
            await asyncio.sleep(interval)

    async def _events(self, url: str, since: int) -> dict[str, Any] | None:
        try:
            response = await self._http.get(f"{url}/v1/lora/events", params={"since": since})
            response.raise_for_status()
            return response.json()
        except httpx.HTTPError:
            return None  # down or partitioned: its events are delivered when it is back

    async def _deliver(self, url: str) -> None:
        started_at, seq = self._cursors.get(url, (0.0, 0))
        batch = await self._events(url, seq)
        if batch is None:
            return
        if batch["started_at"] != started_at:  # restarted: sequence numbers start again
            seq = 0
            batch = await self._events(url, 0) or batch
        for raw in batch["events"]:
            seq = max(seq, raw["seq"])
            await self._dispatch(url, raw)
        self._cursors[url] = (batch["started_at"], seq)

    async def _dispatch(self, url: str, raw: dict[str, Any]) -> None:
        if raw["kind"] not in ("updated", "failed"):
            return
        event = LoRAUpdateEvent(
            lora_id=self._lora_id_of(raw["adapter"]),
            adapter=raw["adapter"],
            timestamp=raw["version"],
            instance_id=raw["instance_id"],
            metadata=raw.get("metadata") or {},
            error_message=raw.get("error_message"),
            phase=raw.get("phase"),
            timings=raw.get("timings") or {},
        )
        if event.error_message is None and self.enable_probe and (problem := await self._smoke_test(url, event)):
            event.error_message, event.phase = problem, "smoke-test"
        callback = self.on_lora_failed if event.error_message else self.on_lora_updated
        if callback is None:
            return
        try:
            result = callback(event)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("lora scheduler: callback %r failed for %s", callback, event)

    async def _smoke_test(self, url: str, event: LoRAUpdateEvent) -> str | None:
        """One greedy token from the new version, end to end over HTTP (the scheduler API's smoke test)."""
        model = f"{event.adapter}@{event.timestamp}"
        try:
            response = await self._http.post(
                f"{url}/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
            )
        except httpx.HTTPError as exc:
            return f"smoke test of {model} on {url} failed: {exc}"
        if response.status_code != 200:
            return f"smoke test of {model} on {url} answered {response.status_code}: {response.text[:300]}"
        return None

    # -- the scheduler API ----------------------------------------------------------------
    async def publish_lora_update(
        self, lora_id: int | str, src_ckpt_dir: str | Path, metadata: dict[str, Any] | None = None
    ) -> str:
        """Publish a PEFT checkpoint as the adapter's newest version; returns its timestamp."""
        store, adapter = self._store_for(lora_id), self.adapter_name(lora_id)
        version = await asyncio.to_thread(store.publish, adapter, src_ckpt_dir, metadata)
        self._notify(adapter, version)
        return version

    async def rollback_lora(self, lora_id: int | str, target_timestamp: str) -> bool:
        """Pin every instance to ``target_timestamp``; False if no such READY version."""
        try:
            await asyncio.to_thread(self._store_for(lora_id).pin, self.adapter_name(lora_id), target_timestamp)
        except NotFoundError as exc:
            logger.warning("lora scheduler: rollback refused: %s", exc)
            return False
        self._notify(self.adapter_name(lora_id), target_timestamp)
        return True

    async def follow_latest(self, lora_id: int | str) -> None:
        """Undo a rollback: every instance follows the newest version again."""
        await asyncio.to_thread(self._store_for(lora_id).follow, self.adapter_name(lora_id))
        self._notify(self.adapter_name(lora_id), None)

    async def get_lora_status(self, lora_id: int | str) -> dict[str, Any]:
        """Current and available versions, and per instance the version it serves."""
        return {"lora_id": lora_id, **await self._status(self.adapter_name(lora_id), self._store_for(lora_id))}

    async def _status(self, adapter: str, store: CheckpointStore) -> dict[str, Any]:
        current = await asyncio.to_thread(store.active_version, adapter)
        available = await asyncio.to_thread(store.versions, adapter)
        instances = {}
        for status in await asyncio.gather(*(self._instance(url) for url in await self._live_urls())):
            serving = (status.get("adapters") or {}).get(adapter)
            if (
                serving is None
                and status["instance_id"]
                and InstanceRecord.model_validate(status).follows_adapter(adapter)
            ):
                # Follows the adapter but has not picked it up yet: not converged, rather than not counted.
                serving = {"served_version": None, "state": "waiting", "last_error": None}
            if serving is not None:
                instances[status["instance_id"] or status["url"]] = {
                    "url": status["url"],
                    "version": serving["served_version"],
                    "state": serving["state"],
                    "last_error": serving["last_error"],
                    "healthy": status["healthy"],
                }
        return {
            "adapter": adapter,
            "current_version": current,
            "available_versions": available,
            "pinned": await asyncio.to_thread(store.pinned_version, adapter),
            "instances": instances,
            "converged": bool(instances) and all(i["version"] == current for i in instances.values()),
        }

    async def get_system_status(self) -> dict[str, Any]:
        """Per instance: health, served versions, heartbeat age, last swap timings, last error."""
        statuses = await asyncio.gather(*(self._instance(url) for url in await self._live_urls()))
        records = {r.instance_id: r for r in await asyncio.to_thread(self.store.instance_records)}
        now = time.time()
        instances = []
        for status in statuses:
            record = records.get(status["instance_id"] or "")
            adapters = status.get("adapters") or {}
            instances.append(
                {
                    "url": status["url"],
                    "instance_id": status["instance_id"],
                    "healthy": status["healthy"],
                    "served_versions": {name: a["served_version"] for name, a in adapters.items()},
                    "heartbeat_age": None if record is None else now - record.heartbeat,
                    "stale": None if record is None else record.is_stale(now),
                    "last_swap": {name: a["last_swap"] for name, a in adapters.items() if a["last_swap"]},
                    "last_error": status.get("error")
                    or next((a["last_error"] for a in adapters.values() if a["last_error"]), None),
                    "weight_version": status.get("weight_version"),
                }
            )
        return {"store": str(self.store.root), "instances": instances, "healthy": sum(i["healthy"] for i in instances)}

    async def _instance(self, url: str) -> dict[str, Any]:
        status: dict[str, Any] = {"url": url, "instance_id": None, "healthy": False}
        try:
            status["healthy"] = (await self._http.get(f"{url}/health")).status_code == 200
            response = await self._http.get(f"{url}/v1/lora/adapters")
            response.raise_for_status()
            status.update(response.json())
        except httpx.HTTPError as exc:
            status["error"] = f"{url}: {exc}"
        return status

    async def wait_converged(self, lora_id: int | str, version: str | None = None, timeout: float = 120.0) -> bool:
        """Wait until every instance following the adapter serves ``version`` (default: the active one)."""
        return await self._wait_converged(self.adapter_name(lora_id), self._store_for(lora_id), version, timeout)

    async def _wait_converged(self, adapter: str, store: CheckpointStore, version: str | None, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = await self._status(adapter, store)
            target = version or status["current_version"]
            if status["instances"] and all(i["version"] == target for i in status["instances"].values()):
                return True
            await asyncio.sleep(0.2)
        return False

    async def _check_followed(self, adapter: str, green: str) -> None:
        """Refuse at once, rather than after ``timeout``, when instances that serve ``adapter``
        would never follow ``green`` (their ``VLLM_HOTSWAP_ADAPTERS`` does not match it)."""
        statuses = await asyncio.gather(*(self._instance(url) for url in await self._live_urls()))
        records = [InstanceRecord.model_validate(s) for s in statuses if s.get("instance_id")]
        blind = [r for r in records if r.follows_adapter(adapter) and not r.follows_adapter(green)]
        if blind:
            names = ", ".join(f"{r.instance_id} (follows {','.join(r.follows)})" for r in blind)
            raise ValueError(
                f"blue-green needs every instance serving {adapter} to follow {green} too; {names} do not: "
                f"give them an adapter pattern that matches both (e.g. VLLM_HOTSWAP_ADAPTERS='{adapter}*', "
                f"or lora-hotswap launch --adapters-per-instance 'lora{{i}}*')"
            )

    async def blue_green_update(
        self,
        lora_id: int | str,
        src_ckpt_dir: str | Path,
        metadata: dict[str, Any] | None = None,
        *,
        verify: Callable[[str], bool | Awaitable[bool]] | None = None,
        timeout: float = 120.0,
    ) -> str:
        """Publish under a new name (``<adapter>-green``), wait until the fleet serves it,
        run ``verify(green_name)``, then switch the served name to it and retire the green
        name. Raises (and retires the green name) if the fleet does not converge or
        ``verify`` says no; the served name is untouched then."""
        adapter = self.adapter_name(lora_id)
        green = f"{adapter}-green"
        store = self._store_for(lora_id)
        await self._check_followed(adapter, green)
        green_version = await asyncio.to_thread(
            store.publish, green, src_ckpt_dir, {**(metadata or {}), "blue_green_of": adapter}
        )
        self._notify(green, green_version)
        try:
            if not await self._wait_converged(green, store, green_version, timeout):
                raise TimeoutError(f"{green}@{green_version} was not served by every instance within {timeout:.0f}s")
            if verify is not None:
                verdict = verify(green)
                if inspect.isawaitable(verdict):
                    verdict = await verdict
                if not verdict:
                    raise RuntimeError(f"verification of {green}@{green_version} failed; {adapter} unchanged")
            version = await asyncio.to_thread(
                store.publish,
                adapter,
                src_ckpt_dir,
                {**(metadata or {}), "blue_green_from": f"{green}@{green_version}"},
            )
            self._notify(adapter, version)
            if not await self._wait_converged(adapter, store, version, timeout):
                raise TimeoutError(f"{adapter}@{version} was not served by every instance within {timeout:.0f}s")
            return version
        finally:
            await asyncio.to_thread(store.retire, green)
            self._notify(green, None)


def create_distributed_lora_scheduler(
    base_port: int = 8001,
    num_gpus: int = 8,
    cpfs_base: str | None = None,
    poll_interval: float = 5.0,
    enable_probe: bool = True,
    **kwargs: Any,
) -> DistributedLoRAScheduler:
    """The scheduler API's factory: instances on ``base_port`` … ``base_port + num_gpus - 1``; the
    store is ``cpfs_base``, else ``VLLM_HOTSWAP_ROOT`` (the scheduler API's original default was a path
    on its authors' cluster)."""
    return DistributedLoRAScheduler(
        base_port=base_port,
        num_gpus=num_gpus,
        cpfs_base=cpfs_base,
        poll_interval=poll_interval,
        enable_probe=enable_probe,
        **kwargs,
    )


def _store_root(cpfs_base: str | None) -> str:
    import os

    root = cpfs_base or os.environ.get("VLLM_HOTSWAP_ROOT")
    if not root:
        raise ValueError("the scheduler needs the store: pass cpfs_base= or set VLLM_HOTSWAP_ROOT")
    return root
