"""What the server and offline engines share: worker RPCs, limits and probe checks."""

from __future__ import annotations

import math
from typing import Any

from vllm.lora.request import LoRARequest

from ..pipeline.engine_api import CheckpointRejected, EngineLimits, LoraHandle, NoCapacity, StageStatus


class WorkerRpcEngine:
    """The :class:`EngineAdapter` methods that talk to the workers' ``hotswap_*`` RPCs."""

    def _rpc(self, method: str, *args: Any) -> list[Any]:
        raise NotImplementedError

    def _vllm_config(self) -> Any:
        raise NotImplementedError

    def limits(self) -> EngineLimits:
        config = self._vllm_config()
        if config.lora_config is None:
            raise RuntimeError("vllm-lora-hotswap needs LoRA enabled (--enable-lora / enable_lora=True)")
        lora, model = config.lora_config, config.model_config
        served = model.served_model_name
        names = [model.model, *([served] if isinstance(served, str) else list(served or []))]
        return EngineLimits(
            max_lora_rank=lora.max_lora_rank,
            max_loras=lora.max_loras,
            max_cpu_loras=lora.max_cpu_loras or lora.max_loras,
            base_models=tuple(dict.fromkeys(names)),
        )

    @staticmethod
    def lora_request(handle: LoraHandle) -> LoRARequest:
        return LoRARequest(lora_name=handle.served_name, lora_int_id=handle.lora_id, lora_path=handle.path)

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
            if result["ok"]:
                continue
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

    @staticmethod
    def check_probe(completion: Any) -> None:
        """A probe's completion must have tokens with finite logprobs. One aborted by the
        engine (a base-weight update pausing it with ``mode=abort``) says nothing about
        the version: that raises a plain error, which the pipeline retries later."""
        if completion is not None and completion.finish_reason == "abort":
            raise RuntimeError("the probe was aborted by the engine (a base-weight update paused it); tried again later")
        if completion is None or not completion.token_ids:
            raise CheckpointRejected("probe", "generation produced no tokens")
        logprobs = [step[token].logprob for token, step in zip(completion.token_ids, completion.logprobs or [])]
        if not all(math.isfinite(v) for v in logprobs):
            raise CheckpointRejected("probe", f"non-finite logprobs {logprobs}")
