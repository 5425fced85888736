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
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

INSTALL_HINT = "pip install 'vllm-lora-hotswap[gpu]' (CUDA) or 'vllm-lora-hotswap[cpu]'"


class FleetWeightSyncClient:
    """``VLLMWeightSyncClient`` for N servers (fan-out; waits for all, raises the first error)."""

    def __init__(
        self, base_urls: Sequence[str], *, api_key: str | None = None, timeout: float = 600.0, mode: str = "wait"
    ):
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
            raise RuntimeError(
                f"{url}{path} not found: start the server with --weight-transfer-config and the plugin active"
            )
        if response.status_code >= 400:
            raise RuntimeError(f"{url}{path} answered {response.status_code}: {response.text[:500]}")
        return response.json() if response.content else {}

    def _all(self, call: Callable[[int, str], Any]) -> list[Any]:
        with ThreadPoolExecutor(max_workers=len(self.base_urls)) as pool:
            return [f.result() for f in [pool.submit(call, i, url) for i, url in enumerate(self.base_urls)]]

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        first = int(init_info.get("rank_offset", 1))
        offsets = [first + sum(self.world_sizes[:i]) for i in range(len(self.base_urls))]
        self._all(
            lambda i, url: self._request(
                "POST", url, "/init_weight_transfer_engine", {"init_info": {**init_info, "rank_offset": offsets[i]}}
            )
        )

    def start_weight_update(self) -> None:
        self._all(lambda i, url: self._request("POST", url, "/start_weight_update", {"mode": self.mode}))

    def update_weights(self, update_info: Any) -> None:
        self._all(lambda i, url: self._request("POST", url, "/update_weights", {"update_info": update_info}))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = weight_version if weight_version is not None else self.weight_version
        self._all(lambda i, url: self._request("POST", url, "/finish_weight_update", {"weight_version": version}))

    def shutdown_weight_transfer_engine(self) -> None:
        self._all(lambda i, url: self._request("POST", url, "/shutdown_weight_transfer_engine"))

    def parameters(self) -> list[tuple[str, dict[str, Any] | None]]:
        """Per server, what an update may contain (``{name: [shape, dtype]}``; None if unknown)."""
        return self._all(
            lambda i, url: (url, self._request("GET", url, "/weight_info?parameters=1").get("parameters"))
        )

    def resume(self) -> None:
        self._all(lambda i, url: self._request("POST", url, "/resume"))


class WeightSync:
    """Push a model's base weights into every engine of the servers behind ``client``.

    ``backend`` must match the servers' ``--weight-transfer-config``: ``nccl``
    (GPU engines, trainer on a GPU) or ``gloo`` (any; the plugin's CPU transport).
    ``keep_buffer`` (gloo): each engine rank keeps its receive buffer between updates,
    host memory the size of the update held for good, so a push does not fault that much
    fresh memory in (an RL loop pushing every step may want it); off by default.
    """

    def __init__(
        self,
        client: FleetWeightSyncClient,
        *,
        backend: str,
        master_port: int,
        master_address: str | None = None,
        keep_buffer: bool = False,
    ):
        try:
            import vllm.distributed.weight_transfer.base  # noqa: F401
        except ImportError:
            raise ImportError(
                f"vLLM is not available: the weight transfer needs it. Install it: {INSTALL_HINT}"
            ) from None
        from vllm.distributed.weight_transfer.base import ModuleSource

        self.client = client
        self.backend = backend
        self.timings: dict[str, float] = {}
        # The model is set per update (send); the rendezvous needs a source already.
        self._no_model = ModuleSource(_empty_module())
        address = master_address or _address_for(client.base_urls)
        world_size = 1 + client.engine_ranks
        if backend == "gloo":
            from .gloo import GlooTrainerInitInfo, GlooTrainerWeightTransferEngine

            self.engine = GlooTrainerWeightTransferEngine.trainer_init(
                GlooTrainerInitInfo(address, master_port, world_size, rank=0, keep_buffer=keep_buffer),
                client=client,
                source=self._no_model,
            )
        elif backend == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import (
                NCCLTrainerInitInfo,
                NCCLTrainerWeightTransferEngine,
            )

            self.engine = NCCLTrainerWeightTransferEngine.trainer_init(
                NCCLTrainerInitInfo(address, master_port, world_size, rank=0), client=client, source=self._no_model
            )
        else:
            raise ValueError(f"unknown weight-transfer backend {backend!r}: use 'nccl' or 'gloo'")

    def send(self, model: Any, weight_version: str | None = None) -> None:
        """Check every parameter of ``model`` (HF names) against each server's, then pause
        (as the client's ``mode`` says), transfer, finish with ``weight_version``, resume.
        A refused or failed update leaves the servers on their previous weights, serving."""
        from vllm.distributed.weight_transfer.base import ModuleSource

        from ..compat.vllm_symbols import source_metadata
        from .spec import check_update

        started = time.perf_counter()
        source = ModuleSource(model)  # a fresh source per update: 0.33 caches its metadata
        # Refused here, before any server pauses, with the parameter's name and shapes.
        meta = [(m.name, m.shape, str(m.dtype)) for m in source_metadata(source)]
        for url, spec in self.client.parameters():
            if spec is not None:
                try:
                    check_update(meta, spec)
                except ValueError as exc:
                    raise ValueError(f"{url} cannot take this update: {exc}") from None
        self.engine.source = source
        self.client.weight_version = weight_version
        checked = time.perf_counter()
        try:
            self.engine.send_weights()
        finally:
            self.engine.source = self._no_model
        # Seconds per phase of this push: the spec check here, then the engine's own where it keeps them.
        self.timings = {
            "spec": checked - started,
            **getattr(self.engine, "timings", {}),
            "total": time.perf_counter() - started,
        }

    def close(self) -> None:
        self.engine.shutdown()
        self.client.shutdown_weight_transfer_engine()


def _empty_module() -> Any:
    import torch

    return torch.nn.Module()


def _address_for(base_urls: Sequence[str]) -> str:
    """This host's address as the servers see it (loopback when they are local)."""
    hosts = {httpx.URL(url).host for url in base_urls}
    if hosts <= {"127.0.0.1", "localhost", "::1"}:
        return "127.0.0.1"
    return socket.gethostbyname(socket.gethostname())
