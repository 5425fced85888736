"""Trainer side of base-weight updates: one call updates every engine of N servers.

:class:`FleetWeightSyncClient` implements vLLM's ``VLLMWeightSyncClient``
protocol over the plugin's HTTP routes (with the servers' API key) and fans
every call out to all servers at once: each server's workers join the same
transfer group, server *i* at rank offset ``1 + sum(world sizes before i)``,
so the group's world size is the trainer plus every engine rank.
:class:`WeightSync` drives a whole update with vLLM's trainer engines
(``nccl`` on GPUs, the plugin's ``gloo`` on CPUs).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

INSTALL_HINT = "pip install 'vllm-lora-hotswap[gpu]' (CUDA) or 'vllm-lora-hotswap[cpu]'"


class FleetWeightSyncClient:
    """``VLLMWeightSyncClient`` for N servers (fan-out; waits for all, raises the first error)."""

    def __init__(self, base_urls: Sequence[str], *, api_key: str | None = None, timeout: float = 600.0, mode: str = "wait"):
        if not base_urls:
            raise ValueError("FleetWeightSyncClient needs at least one server URL")
        self.base_urls = [url.rstrip("/") for url in base_urls]
        self.mode = mode
        self.weight_version: str | None = None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(headers=headers, timeout=timeout)
        self.world_sizes = [int(self._request("GET", url, "/get_world_size")["world_size"]) for url in self.base_urls]

    @property
    def engine_ranks(self) -> int:
        return sum(self.world_sizes)

    def _request(self, method: str, url: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            response = self._http.request(method, url + path, json=body)
        except httpx.TransportError as exc:
            raise ConnectionError(f"The vLLM server can't be reached at {url} ({exc})") from None
        if response.status_code == 404:
            raise RuntimeError(f"{url}{path} not found: start the server with --weight-transfer-config and the plugin active")
        if response.status_code >= 400:
            raise RuntimeError(f"{url}{path} answered {response.status_code}: {response.text[:500]}")
        return response.json() if response.content else {}

    def _all(self, call: Callable[[int, str], Any]) -> list[Any]:
        with ThreadPoolExecutor(max_workers=len(self.base_urls)) as pool:
            return [f.result() for f in [pool.submit(call, i, url) for i, url in enumerate(self.base_urls)]]

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        first = int(init_info.get("rank_offset", 1))
        offsets = [first + sum(self.world_sizes[:i]) for i in range(len(self.base_urls))]
        self._all(lambda i, url: self._request("POST", url, "/init_weight_transfer_engine",
                                               {"init_info": {**init_info, "rank_offset": offsets[i]}}))

    def start_weight_update(self) -> None:
        self._all(lambda i, url: self._request("POST", url, "/start_weight_update", {"mode": self.mode}))

    def update_weights(self, update_info: Any) -> None:
        self._all(lambda i, url: self._request("POST", url, "/update_weights", {"update_info": update_info}))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = weight_version if weight_version is not None else self.weight_version
        self._all(lambda i, url: self._request("POST", url, "/finish_weight_update", {"weight_version": version}))

    def shutdown_weight_transfer_engine(self) -> None:
        self._all(lambda i, url: self._request("POST", url, "/shutdown_weight_transfer_engine"))

    def resume(self) -> None:
        self._all(lambda i, url: self._request("POST", url, "/resume"))


class _ModuleSlot:
    """A ``WeightSource`` whose module is set per update (the rendezvous happens before)."""

    def __init__(self) -> None:
        self.module: Any = None

    def metadata(self) -> list[Any]:
        from vllm.distributed.weight_transfer.base import ModuleSource

        return ModuleSource(self._module()).metadata()

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        from vllm.distributed.weight_transfer.base import ModuleSource

        return iter(ModuleSource(self._module()))

    def _module(self) -> Any:
        if self.module is None:
            raise RuntimeError("no model to send: call update_model_weights(model)")
        return self.module


class WeightSync:
    """Push a model's base weights into every engine of the servers behind ``client``.

    ``backend`` must match the servers' ``--weight-transfer-config``: ``nccl``
    (GPU engines, trainer on a GPU) or ``gloo`` (any; the plugin's CPU transport).
    """

    def __init__(self, client: FleetWeightSyncClient, *, backend: str, master_port: int, master_address: str | None = None):
        try:
            import vllm.distributed.weight_transfer.base  # noqa: F401
        except ImportError:
            raise ImportError(f"vLLM is not available: the weight transfer needs it. Install it: {INSTALL_HINT}") from None
        self.client = client
        self.backend = backend
        self._slot = _ModuleSlot()
        address = master_address or _address_for(client.base_urls)
        world_size = 1 + client.engine_ranks
        if backend == "gloo":
            from .engine.gloo_transfer import GlooTrainerInitInfo, GlooTrainerWeightTransferEngine

            self.engine = GlooTrainerWeightTransferEngine.trainer_init(
                GlooTrainerInitInfo(address, master_port, world_size, rank=0), client=client, source=self._slot
            )
        elif backend == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

            self.engine = NCCLTrainerWeightTransferEngine.trainer_init(
                NCCLTrainerInitInfo(address, master_port, world_size, rank=0), client=client, source=self._slot
            )
        else:
            raise ValueError(f"unknown weight-transfer backend {backend!r}: use 'nccl' or 'gloo'")

    def send(self, model: Any, weight_version: str | None = None) -> None:
        """Pause (as the client's ``mode`` says), transfer every parameter of ``model``
        (HF names), finish with ``weight_version``, resume."""
        self._slot.module = model
        self.client.weight_version = weight_version
        try:
            self.engine.send_weights()
        finally:
            self._slot.module = None

    def close(self) -> None:
        self.engine.shutdown()
        self.client.shutdown_weight_transfer_engine()


def _address_for(base_urls: Sequence[str]) -> str:
    """This host's address as the servers see it (loopback when they are local)."""
    hosts = {httpx.URL(url).host for url in base_urls}
    if hosts <= {"127.0.0.1", "localhost", "::1"}:
        return "127.0.0.1"
    return socket.gethostbyname(socket.gethostname())
