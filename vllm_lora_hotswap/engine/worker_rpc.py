"""What the server and offline engines share: worker RPCs, limits and probe checks."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from vllm.lora.request import LoRARequest

from ..pipeline.engine_api import (
    CheckpointRejected,
    EngineLimits,
    EngineUnavailable,
    InstallRequest,
    LoraHandle,
    NoCapacity,
    StageStatus,
)
from .cache_room import runtime_lora_updating
from .stage_channel import ServerChannel

RPC_STATUS_INTERVAL_S = 0.02  # without a stage channel, how often a stage is asked about


def probe_token_ids(tokenizer: Any, prompt: str | None) -> list[int]:
    """The probe's prompt as token ids: ``prompt`` if set, else one token, the tokenizer's
    BOS (without one, the first token of "Hello"). One position runs every LoRA module of
    the new version and a NaN anywhere in its weights reaches the sampled token's logprob,
    and on vLLM's CPU backend a step costs about its number of tokens, so the probe's
    prefill is kept to one."""
    if tokenizer is None:
        return [0]
    if prompt is not None:
        return list(tokenizer.encode(prompt)) or [0]
    if tokenizer.bos_token_id is not None:
        return [tokenizer.bos_token_id]
    return list(tokenizer.encode("Hello", add_special_tokens=False))[:1] or [0]


class WorkerRpcEngine:
    """The :class:`EngineAdapter` methods that talk to the workers' ``hotswap_*`` RPCs,
    and, where the engine has one, their stage channel."""

    channel: ServerChannel | None = None
    probes_overlap = False
    hashes_while_staging = True  # the workers' staging reads each weight file once (:mod:`.single_read`)

    def _timed_rpc(self, method: str, *args: Any) -> tuple[list[Any], float | None]:
        """One result per worker, and how long the engine core was held (None: unknown)."""
        return self._rpc(method, *args), None

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
            kept_for_vllm=1 if runtime_lora_updating() else 0,  # .cache_room
            base_models=tuple(dict.fromkeys(names)),
        )

    @staticmethod
    def lora_request(handle: LoraHandle) -> LoRARequest:
        return LoRARequest(lora_name=handle.served_name, lora_int_id=handle.lora_id, lora_path=handle.path)

    def read_ahead(self, path: str, sha256: str, size: int) -> bool:
        """Have every worker read a just-written weight file ahead of its commit (a publisher's
        notice, :mod:`.read_ahead`); False without a stage channel (RPCs would wait for a step)."""
        return self.channel is not None and self.channel.read_ahead(path, sha256, size)

    def stage(self, handles: Sequence[LoraHandle]) -> None:
        items = [[h.lora_id, h.served_name, h.path] for h in handles]
        if self.channel is None or not self.channel.stage(items):
            self._rpc("hotswap_stage", items)

    def wait_staged(self, handle: LoraHandle, timeout: float) -> None:
        if self.channel is not None:
            self.channel.wait((handle.lora_id, handle.path), timeout)
        else:
            time.sleep(min(timeout, RPC_STATUS_INTERVAL_S))

    def stage_status(self, handles: Sequence[LoraHandle]) -> list[StageStatus]:
        per_handle = [self.channel.statuses((h.lora_id, h.path)) if self.channel else None for h in handles]
        unknown = [h for h, ranks in zip(handles, per_handle) if ranks is None]
        if unknown:  # not staged through the channel, or its reports stopped coming
            asked = iter(zip(*self._rpc("hotswap_status", [[h.lora_id, h.served_name, h.path] for h in unknown])))
            per_handle = [next(asked) if ranks is None else ranks for ranks in per_handle]
        statuses = []
        for per_rank in per_handle:  # one handle, every rank
            failed = [(i, r) for i, r in enumerate(per_rank) if r["state"] == "failed"]
            if failed:
                rank, result = failed[0]
                statuses.append(StageStatus("failed", _on_worker(rank, len(per_rank), result["error"])))
            elif all(r["state"] == "ready" for r in per_rank):
                timings: dict[str, float] = {}  # per phase, the slowest rank's
                for result in per_rank:
                    for phase, seconds in (result.get("timings") or {}).items():
                        timings[phase] = max(seconds, timings.get(phase, 0.0))
                statuses.append(StageStatus("ready", nbytes=sum(r["nbytes"] for r in per_rank), timings=timings))
            else:
                statuses.append(StageStatus("pending"))
        return statuses

    def install(self, requests: Sequence[InstallRequest]) -> list[float | Exception]:
        """New slot ids go over the stage channel, flipped by the workers while the engine
        runs; the rest (in-place replacements, slots that must be copied, installs whose
        answers did not come) by one RPC between two steps."""
        results: dict[int, float | Exception] = {}
        if self.channel is not None:
            flips = [i for i, r in enumerate(requests) if r.replace is None]
            answers = self.channel.install([(requests[i].handle.lora_id, requests[i].handle.path) for i in flips])
            for i, per_rank in zip(flips, answers):
                if per_rank is not None and not any(answer.get("in_step") for answer in per_rank):
                    # Nothing waited for a step boundary: the stall is the longest a step's
                    # start could have waited for the slot lock the flip held.
                    results[i] = _install_outcome(per_rank, max(answer["seconds"] for answer in per_rank))
        rest = [i for i in range(len(requests)) if i not in results]
        if rest:
            items = [
                [requests[i].handle.lora_id, requests[i].handle.path, requests[i].replace is not None] for i in rest
            ]
            ranks, held = self._timed_rpc("hotswap_install", items)
            # The engine loop is held once for the batch: measured in the engine core where it
            # can be (the round trip to the workers included), else on the workers.
            stall = held if held is not None else max(rank["seconds"] for rank in ranks)
            for i, per_rank in zip(rest, zip(*(rank["results"] for rank in ranks))):
                results[i] = _install_outcome(per_rank, stall)
        return [results[i] for i in range(len(requests))]

    def worker_states(self) -> tuple[list[dict[str, Any]], float | None]:
        """One ``WorkerHotSwap.state()`` per worker, and how long that RPC held the engine
        core: the cost of any worker RPC between two steps (it only reads)."""
        return self._timed_rpc("hotswap_state")

    def commit(self, handle: LoraHandle) -> None:
        self._rpc("hotswap_commit", handle.lora_id)

    def restore(self, handle: LoraHandle) -> None:
        self._rpc("hotswap_restore", handle.lora_id)

    def remove(self, handle: LoraHandle) -> None:
        self._rpc("hotswap_remove", handle.lora_id, handle.path)
        if self.channel is not None:
            self.channel.forget((handle.lora_id, handle.path))

    @staticmethod
    def probe_verdict(completion: Any) -> Exception | None:
        """A probe that ran must have produced tokens with finite logprobs. One aborted by the
        engine (a base-weight update pausing it with ``mode=abort``) says nothing about the
        version: the pipeline tries it again later."""
        if completion is not None and completion.finish_reason == "abort":
            return EngineUnavailable("the probe was aborted by the engine (a base-weight update paused it)")
        if completion is None or not completion.token_ids:
            return CheckpointRejected("probe", "generation produced no tokens")
        logprobs = [step[token].logprob for token, step in zip(completion.token_ids, completion.logprobs or [])]
        if not all(math.isfinite(v) for v in logprobs):
            return CheckpointRejected("probe", f"non-finite logprobs {logprobs}")
        return None


def _install_outcome(per_rank: Sequence[dict[str, Any]], stall: float) -> float | Exception:
    failed = next(((i, r) for i, r in enumerate(per_rank) if not r["ok"]), None)
    if failed is None:
        return stall
    rank, error = failed
    message = _on_worker(rank, len(per_rank), error["error"])
    return NoCapacity(message) if error.get("capacity") else CheckpointRejected("install", message)


def _on_worker(rank: int, workers: int, error: str) -> str:
    """Name the worker (rank, or replica × rank, in ``GET /v1/lora/workers`` order) when there are several."""
    return error if workers == 1 else f"worker {rank} of {workers}: {error}"
