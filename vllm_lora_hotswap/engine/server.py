"""The swap pipeline's engine for a served vLLM (``AsyncLLM`` behind the OpenAI server).

The controller runs in its own thread; every call here hops onto the API
server's event loop (where ``AsyncLLM`` and the routing table live) and waits
for the result, so the loop itself never blocks on the store or on a swap.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

from vllm.lora.request import LoRARequest
from vllm.sampling_params import SamplingParams

from ..pipeline.engine_api import CheckpointRejected, EngineLimits, LoraHandle, NoCapacity, StageStatus
from ..settings import HotSwapSettings

T = TypeVar("T")
RPC_TIMEOUT = 120.0


class ServerEngine:
    def __init__(self, engine_client: Any, models: Any, loop: asyncio.AbstractEventLoop, settings: HotSwapSettings):
        if engine_client.vllm_config.lora_config is None:
            raise RuntimeError("vllm-lora-hotswap needs LoRA enabled: start the server with --enable-lora")
        self.client = engine_client
        self.models = models  # OpenAIServingModels: lora_requests is the routing table
        self.loop = loop
        self.settings = settings
        self._requests: dict[tuple[int, str], LoRARequest] = {}
        tokenizer = getattr(engine_client.renderer, "tokenizer", None)
        ids = tokenizer.encode(settings.probe_prompt) if tokenizer is not None else []
        self._probe_ids = list(ids) or [0]

    # -- plumbing ----------------------------------------------------------------------
    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = RPC_TIMEOUT) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _rpc(self, method: str, *args: Any) -> list[Any]:
        return self._call(self.client.collective_rpc(method, timeout=RPC_TIMEOUT, args=args))

    def request(self, handle: LoraHandle) -> LoRARequest:
        """The one LoRARequest object for ``handle`` (name, id and path never change)."""
        key = (handle.lora_id, handle.path)
        request = self._requests.get(key)
        if request is None or request.lora_name != handle.served_name:
            request = self._requests[key] = LoRARequest(
                lora_name=handle.served_name, lora_int_id=handle.lora_id, lora_path=handle.path
            )
        return request

    # -- EngineAdapter -----------------------------------------------------------------
    def limits(self) -> EngineLimits:
        lora = self.client.vllm_config.lora_config
        model = self.client.model_config
        served = model.served_model_name
        names = [model.model, *([served] if isinstance(served, str) else list(served or []))]
        return EngineLimits(
            max_lora_rank=lora.max_lora_rank,
            max_loras=lora.max_loras,
            max_cpu_loras=lora.max_cpu_loras or lora.max_loras,
            base_models=tuple(dict.fromkeys(names)),
        )

    def new_lora_id(self) -> int:
        return self.models.lora_id_counter.inc(1)

    def stage(self, handle: LoraHandle) -> None:
        self._rpc("hotswap_stage", handle.lora_id, handle.served_name, handle.path)

    def stage_status(self, handle: LoraHandle) -> StageStatus:
        ranks = self._rpc("hotswap_status", handle.lora_id, handle.path)
        failed = [r for r in ranks if r["state"] == "failed"]
        if failed:
            return StageStatus("failed", failed[0]["error"])
        if all(r["state"] == "ready" for r in ranks):
            return StageStatus("ready", nbytes=sum(r["nbytes"] for r in ranks))
        return StageStatus("pending")

    def install(self, handle: LoraHandle, replace: LoraHandle | None) -> float:
        ranks = self._rpc("hotswap_install", handle.lora_id, handle.path, replace is not None)
        for result in ranks:
            if not result["ok"]:
                if result.get("capacity"):
                    raise NoCapacity(result["error"])
                raise CheckpointRejected("install", result["error"])
        return max(r["seconds"] for r in ranks)

    def commit(self, handle: LoraHandle) -> None:
        self._rpc("hotswap_commit", handle.lora_id)

    def restore(self, handle: LoraHandle) -> None:
        self._rpc("hotswap_restore", handle.lora_id)

    def remove(self, handle: LoraHandle) -> None:
        self._rpc("hotswap_remove", handle.lora_id, handle.path)
        self._requests.pop((handle.lora_id, handle.path), None)

    def probe(self, handle: LoraHandle) -> None:
        params = SamplingParams(
            max_tokens=self.settings.probe_max_tokens, temperature=0.0, ignore_eos=True, logprobs=0, detokenize=False
        )
        request = self.request(handle)

        async def generate() -> Any:
            (prompt,) = await self.client.renderer.render_cmpl_async([{"prompt_token_ids": self._probe_ids}])
            final = None
            async for output in self.client.generate(
                prompt, params, f"hotswap-probe-{uuid.uuid4().hex}", lora_request=request
            ):
                final = output
            return final

        try:
            final = self._call(generate())
        except Exception as exc:
            raise CheckpointRejected("probe", f"generation raised {type(exc).__name__}: {exc}") from None
        completion = final.outputs[0] if final is not None and final.outputs else None
        if completion is None or not completion.token_ids:
            raise CheckpointRejected("probe", "generation produced no tokens")
        logprobs = [step[token].logprob for token, step in zip(completion.token_ids, completion.logprobs or [])]
        if not all(math.isfinite(v) for v in logprobs):
            raise CheckpointRejected("probe", f"non-finite logprobs {logprobs}")

    def route(self, handle: LoraHandle, *, current: bool) -> None:
        request = self.request(handle)

        async def apply() -> None:  # on the loop: no request sees a half-updated table
            self.models.lora_requests[f"{handle.adapter}@{handle.version}"] = request
            if current:
                self.models.lora_requests[handle.adapter] = request

        self._call(apply())

    def unroute(self, adapter: str, version: str | None) -> None:
        key = adapter if version is None else f"{adapter}@{version}"

        async def apply() -> None:
            self.models.lora_requests.pop(key, None)

        self._call(apply())

    def in_flight(self, handle: LoraHandle) -> int:
        async def count() -> int:
            states = self.client.output_processor.request_states.values()
            return sum(1 for state in states if state.lora_name == handle.served_name)

        return self._call(count())

    def worker_state(self) -> list[dict[str, Any]]:
        return self._rpc("hotswap_state")
