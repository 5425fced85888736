"""The ``vllm_backend``-compatible client API, backed by the store and the plugin's routes.

Configured from the environment as that API is::

    VLLM_BASE_URL=http://localhost:8000     # or VLLM_HOST + VLLM_PORT; several URLs comma-separated
    VLLM_GROUP_PORT=51216                   # weight-update rendezvous port (on this, the trainer's, host)
    VLLM_TIMEOUT=5.0                        # seconds to connect (generation and updates wait longer)
    VLLM_ENABLE_LORA=true  VLLM_MAX_LORAS=4  VLLM_MAX_LORA_RANK=64
    VLLM_API_KEY=...                        # the servers' --api-key, if any
    VLLM_HOTSWAP_ROOT=/cpfs/lora_ckpts      # the store register_lora_adapter publishes into

Example::

    import vllm_lora_hotswap.client as vllm_backend
    vllm_backend.register_lora_adapter("my_adapter", "/path/to/peft_out")   # every server gets it
    vllm_backend.generate_with_vllm(["Once upon a time"], {"max_tokens": 50}, adapter="my_adapter")
    vllm_backend.init_communicator(device="cpu")       # "cuda" → NCCL, else the plugin's gloo
    vllm_backend.update_model_weights(model)           # base weights into every engine
    vllm_backend.close_communicator()
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, Field

from .store import CheckpointStore, check_adapter_name
from .weights.trainer import INSTALL_HINT, FleetWeightSyncClient, WeightSync

PAUSED_FIRST_DELAY, PAUSED_MAX_DELAY = 0.05, 2.0


def _paused(response: httpx.Response) -> bool:
    """vLLM 0.33's refusal of a request while paused: its engine_paused error reaches
    HTTP as a 503 ServiceUnavailableError with this message (the code stays inside)."""
    return response.status_code == 503 and (
        "Generation is paused" in response.text or "engine_paused" in response.text
    )


class VLLMClientConfig(BaseModel):
    base_urls: list[str] = Field(default_factory=lambda: ["http://localhost:8000"])
    group_port: int = 51216
    group_host: str | None = None
    timeout: float = 5.0
    enable_lora: bool = True
    max_loras: int = 4
    max_lora_rank: int = 64
    api_key: str | None = None
    store_root: str | None = None
    update_mode: str = "wait"  # what generation does during a base-weight update: abort | wait | keep
    register_timeout: float = 120.0
    paused_timeout: float = 600.0  # how long generation retries while a weight update pauses a server

    @classmethod
    def from_env(cls) -> VLLMClientConfig:
        env = os.environ
        urls = env.get("VLLM_BASE_URL") or f"http://{env.get('VLLM_HOST', 'localhost')}:{env.get('VLLM_PORT', '8000')}"
        values: dict[str, Any] = {"base_urls": [u.strip() for u in urls.split(",") if u.strip()]}
        for key, name in (
            ("group_port", "VLLM_GROUP_PORT"),
            ("timeout", "VLLM_TIMEOUT"),
            ("enable_lora", "VLLM_ENABLE_LORA"),
            ("max_loras", "VLLM_MAX_LORAS"),
            ("max_lora_rank", "VLLM_MAX_LORA_RANK"),
            ("api_key", "VLLM_API_KEY"),
            ("store_root", "VLLM_HOTSWAP_ROOT"),
            ("group_host", "VLLM_GROUP_HOST"),
        ):
            if env.get(name):
                values[key] = env[name]
        return cls(**values)


class VLLMClient:
    def __init__(self, config: VLLMClientConfig | dict[str, Any] | None = None):
        if isinstance(config, dict):
            config = VLLMClientConfig(**config)
        self.config = config or VLLMClientConfig.from_env()
        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(300.0, connect=self.config.timeout))
        self._sync: WeightSync | None = None
        self._sync_client: FleetWeightSyncClient | None = None
        for url in self.config.base_urls:
            self._get(url, "/health")

    @property
    def base_url(self) -> str:
        return self.config.base_urls[0]

    def _send(
        self, method: str, url: str, path: str, body: dict[str, Any] | None = None, *, retry_paused: bool = False
    ) -> httpx.Response:
        delay, deadline = PAUSED_FIRST_DELAY, time.monotonic() + self.config.paused_timeout
        while True:
            try:
                response = self._http.request(method, url.rstrip("/") + path, json=body)
            except httpx.TransportError:
                raise ConnectionError(f"The vLLM server can't be reached at {url}") from None
            # vLLM >= 0.33 refuses new requests while a base-weight update pauses it
            # (abort and wait modes): 503 engine_paused, to be retried once it resumes.
            if not (retry_paused and _paused(response)) or time.monotonic() + delay > deadline:
                break
            time.sleep(delay)
            delay = min(delay * 2, PAUSED_MAX_DELAY)
        if response.status_code >= 400:
            detail = response.json().get("error", response.text) if response.content else ""
            if isinstance(detail, dict):  # vLLM's error shape: {"message", "type", "param", "code"}
                detail = detail.get("message", detail)
            raise RuntimeError(f"{url}{path} answered {response.status_code}: {detail}")
        return response

    def _get(self, url: str, path: str) -> Any:
        response = self._send("GET", url, path)
        return response.json() if response.content else None

    def _store(self) -> CheckpointStore:
        if not self.config.store_root:
            raise ValueError("no checkpoint store: set VLLM_HOTSWAP_ROOT (or store_root) to the servers' store")
        return CheckpointStore(self.config.store_root)

    # -- generation --------------------------------------------------------------------
    def generate(
        self, prompts: list[str], sampling_params: dict[str, Any] | None = None, adapter: str | None = None
    ) -> list[dict[str, Any]]:
        """One sample per prompt from the first server's ``POST /api/v1/sample``: ``{"text", "token_ids",
        "prompt_token_ids", "finish_reason", "model", "version"}`` (plus ``"logprobs"`` with
        ``{"logprobs": True}``). ``adapter`` is ``"lora1"`` (its served version), ``"lora1@<version>"``
        (that version) or None (the base model); ``model`` and ``version`` name what generated each sample.

        Example: ``client.generate(["Once upon a time"], {"max_tokens": 50, "temperature": 0.8}, adapter="lora1")``
        """
        body = {"prompts": prompts, "model_id": adapter, "sampling_params": sampling_params or {}}
        return self._send("POST", self.base_url, "/api/v1/sample", body, retry_paused=True).json()["samples"]

    # -- adapters ----------------------------------------------------------------------
    def register_lora_adapter(self, adapter_id: str, lora_path: str | os.PathLike[str]) -> str:
        """Publish ``lora_path`` into the store (so the whole fleet gets it) and wait
        until every configured server serves that version. Returns the version."""
        check_adapter_name(adapter_id)
        if not Path(lora_path).exists():
            raise ValueError(f"LoRA path does not exist: {lora_path}")
        version = self._store().publish(adapter_id, lora_path, {"registered_by": "vllm_lora_hotswap.client"})
        self._wait(lambda served: served.get(adapter_id) == version, f"{adapter_id}@{version} to be served")
        return version

    def unregister_lora_adapter(self, adapter_id: str) -> None:
        """Retire the adapter everywhere (its slots are freed; its versions stay in the store)."""
        self._store().retire(check_adapter_name(adapter_id))
        self._wait(lambda served: adapter_id not in served, f"{adapter_id} to be retired")

    def list_lora_adapters(self) -> list[dict[str, Any]]:
        """Adapters the first server serves: ``{"adapter_id", "lora_path", "version"}``."""
        adapters = self._get(self.base_url, "/v1/lora/adapters")["adapters"]
        root = self._get(self.base_url, "/v1/models")["data"]
        paths = {m["id"]: m.get("root") for m in root}
        return [
            {"adapter_id": name, "lora_path": paths.get(name), "version": a["served_version"]}
            for name, a in sorted(adapters.items())
            if a["served_version"] is not None
        ]

    def _served(self, url: str) -> dict[str, str]:
        adapters = self._get(url, "/v1/lora/adapters")["adapters"]
        return {name: a["served_version"] for name, a in adapters.items() if a["served_version"] is not None}

    def _wait(self, done: Any, what: str) -> None:
        deadline = time.monotonic() + self.config.register_timeout
        pending = list(self.config.base_urls)
        while pending:
            pending = [url for url in pending if not done(self._served(url))]
            if pending and time.monotonic() > deadline:
                raise TimeoutError(
                    f"timed out after {self.config.register_timeout:.0f}s waiting for {what} on {', '.join(pending)}"
                )
            if pending:
                time.sleep(0.2)

    # -- base weights ------------------------------------------------------------------
    def init_communicator(self, device: str = "cuda") -> None:
        """Join the weight-update group of every server: NCCL for ``cuda`` devices, else gloo."""
        if self._sync is not None:
            raise RuntimeError("the communicator is already initialised; call close_communicator() first")
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        self._sync_client = FleetWeightSyncClient(
            self.config.base_urls, api_key=self.config.api_key, mode=self.config.update_mode
        )
        self._sync = WeightSync(
            self._sync_client,
            backend=backend,
            master_port=self.config.group_port,
            master_address=self.config.group_host,
        )

    def update_model_weights(self, model: Any, weight_version: str | None = None) -> None:
        """Send every parameter of ``model`` (HF names) to every engine; adapters stay served."""
        if self._sync is None:
            raise RuntimeError("no communicator: call init_communicator(device) first")
        self._sync.send(model, weight_version or time.strftime("%Y-%m-%dT%H-%M-%SZ", time.gmtime()))

    def close_communicator(self) -> None:
        if self._sync is not None:
            self._sync.close()
        self._sync = self._sync_client = None

    def reset_prefix_cache(self) -> None:
        for url in self.config.base_urls:
            self._send("POST", url, "/reset_prefix_cache")

    def get_client_info(self) -> dict[str, Any]:
        return {
            "base_urls": self.config.base_urls,
            "store_root": self.config.store_root,
            "group_port": self.config.group_port,
            "communicator": None if self._sync is None else self._sync.backend,
            "enable_lora": self.config.enable_lora,
            "max_loras": self.config.max_loras,
            "max_lora_rank": self.config.max_lora_rank,
            "adapters": self.list_lora_adapters(),
        }


_client: VLLMClient | None = None


def initialize_vllm_client(config: VLLMClientConfig | dict[str, Any] | None = None) -> VLLMClient:
    """Connect to the configured servers (``ConnectionError`` naming the URL if one is down)."""
    global _client
    _client = VLLMClient(config)
    return _client


def _get_client() -> VLLMClient:
    return _client if _client is not None else initialize_vllm_client()


def generate_with_vllm(
    prompts: list[str], sampling_params: dict[str, Any] | None = None, adapter: str | None = None
) -> list[dict[str, Any]]:
    return _get_client().generate(prompts, sampling_params, adapter)


def register_lora_adapter(adapter_id: str, lora_path: str | os.PathLike[str]) -> str:
    return _get_client().register_lora_adapter(adapter_id, lora_path)


def unregister_lora_adapter(adapter_id: str) -> None:
    _get_client().unregister_lora_adapter(adapter_id)


def list_lora_adapters() -> list[dict[str, Any]]:
    return _get_client().list_lora_adapters()


def init_communicator(device: str = "cuda") -> None:
    _get_client().init_communicator(device)


def update_model_weights(model: Any, weight_version: str | None = None) -> None:
    _get_client().update_model_weights(model, weight_version)


def close_communicator() -> None:
    _get_client().close_communicator()


def reset_prefix_cache() -> None:
    _get_client().reset_prefix_cache()


def get_client_info() -> dict[str, Any]:
    return _get_client().get_client_info()


__all__ = [
    "INSTALL_HINT",
    "VLLMClient",
    "VLLMClientConfig",
    "close_communicator",
    "generate_with_vllm",
    "get_client_info",
    "init_communicator",
    "initialize_vllm_client",
    "list_lora_adapters",
    "register_lora_adapter",
    "reset_prefix_cache",
    "unregister_lora_adapter",
    "update_model_weights",
]
