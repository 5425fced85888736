"""Colocated use: an offline ``vllm.LLM`` (e.g. inside a trainer) that follows a store.

Same pipeline and the same versioning as a server, without one: the caller
decides when to look at the store (:meth:`LocalHotSwap.sync`), between its own
``generate`` calls, which are the step boundaries of an offline engine.

Example::

    import os
    os.environ["VLLM_HOTSWAP_ROOT"] = "/cpfs/lora_ckpts"   # before LLM(): the workers need the plugin
    from vllm import LLM, SamplingParams
    from vllm_lora_hotswap.engine.offline import LocalHotSwap

    llm = LLM(model="Qwen/Qwen2.5-0.5B", enable_lora=True, max_loras=2, max_cpu_loras=4)
    hotswap = LocalHotSwap(llm)
    hotswap.sync()                                   # load (or refresh) the active versions
    request = hotswap.lora_request("lora1")          # lora1's current version
    outputs = llm.generate(prompts, SamplingParams(max_tokens=64), lora_request=request)
    old = hotswap.lora_request("lora1@2025-08-18T10-00-00Z")   # a pinned, retained version
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any

from vllm.lora.request import LoRARequest
from vllm.sampling_params import SamplingParams

from ..pipeline.controller import SwapController
from ..pipeline.engine_api import EngineUnavailable, LoraHandle
from ..settings import load_settings
from ..store import CheckpointStore, InstanceRecord, NotFoundError, SwapRecord, split_served_name
from .worker_rpc import WorkerRpcEngine, probe_token_ids

# Offline users pick their own LoRA ids; start ours far above any hand-picked one.
_FIRST_LORA_ID = 1 << 20


class OfflineEngine(WorkerRpcEngine):
    """:class:`~vllm_lora_hotswap.pipeline.engine_api.EngineAdapter` for ``vllm.LLM``."""

    def __init__(self, llm: Any, probe_ids: list[int], probe_max_tokens: int):
        self.llm = llm
        self.routes: dict[str, LoRARequest] = {}
        self._ids = itertools.count(_FIRST_LORA_ID)
        self._probe_ids = probe_ids
        self._probe_max_tokens = probe_max_tokens

    def _rpc(self, method: str, *args: Any) -> list[Any]:
        try:
            return self.llm.collective_rpc(method, args=args)
        except Exception as exc:
            # vLLM's run_method raises NotImplementedError for a method the worker lacks;
            # across processes it arrives as a plain Exception carrying that message.
            if not isinstance(exc, NotImplementedError) and f"Method {method!r} is not implemented" not in str(exc):
                raise
            raise RuntimeError(
                "the vLLM workers have no hot-swap methods: set VLLM_HOTSWAP_ROOT before creating the LLM "
                "so the plugin loads in its worker processes"
            ) from exc

    def _vllm_config(self) -> Any:
        return self.llm.llm_engine.vllm_config

    def new_lora_id(self) -> int:
        return next(self._ids)

    def probe(self, handles: Sequence[LoraHandle]) -> list[Exception | None]:
        params = SamplingParams(max_tokens=self._probe_max_tokens, temperature=0.0, ignore_eos=True, logprobs=0)
        try:  # one generate call: the probes run as one batch
            outputs = self.llm.generate(
                [{"prompt_token_ids": list(self._probe_ids)} for _ in handles],
                params,
                lora_request=[self.lora_request(h) for h in handles],
                use_tqdm=False,
            )
        except Exception as exc:  # the engine's trouble, not a verdict on the versions
            return [EngineUnavailable(f"probe generation raised {type(exc).__name__}: {exc}")] * len(handles)
        return [self.probe_verdict(output.outputs[0] if output.outputs else None) for output in outputs]

    def route(self, handle: LoraHandle, *, current: bool) -> None:
        request = self.lora_request(handle)
        self.routes[f"{handle.adapter}@{handle.version}"] = request
        if current:
            self.routes[handle.adapter] = request

    def hold_requests(self, adapter: str) -> None:
        """Nothing to hold: the caller's :meth:`LocalHotSwap.sync` swaps between its own
        ``generate`` calls, so no request can arrive during a probe."""

    def release_requests(self, adapter: str) -> None:
        pass

    def open_for_sampling(self, handle: LoraHandle) -> None:
        """Nothing to open: no request arrives during a probe (see :meth:`hold_requests`)."""

    def close_for_sampling(self, handle: LoraHandle, *, passed: bool) -> None:
        pass

    def unroute(self, adapter: str, version: str | None) -> None:
        self.routes.pop(adapter if version is None else f"{adapter}@{version}", None)

    def in_flight(self, handle: LoraHandle) -> int:
        states = self.llm.llm_engine.output_processor.request_states.values()
        return sum(1 for state in states if state.lora_name == handle.served_name)


class LocalHotSwap:
    """Follow a checkpoint store from an offline ``LLM``; see the module docstring."""

    def __init__(self, llm: Any, root: str | os.PathLike[str] | None = None, **settings: Any):
        self.settings = load_settings(**({"root": root} if root is not None else {}), **settings)
        if self.settings.root is None:
            raise ValueError("LocalHotSwap needs a store: pass root= or set VLLM_HOTSWAP_ROOT")
        probe_ids = probe_token_ids(llm.llm_engine.tokenizer, self.settings.probe_prompt)
        self.engine = OfflineEngine(llm, probe_ids, self.settings.probe_max_tokens)
        self.controller = SwapController(
            CheckpointStore(self.settings.root),
            self.engine,
            self.settings,
            self.settings.instance_id or f"offline-{os.uname().nodename}-{os.getpid()}",
        )

    def sync(self) -> list[SwapRecord]:
        """Look at the store once: swap every adapter whose active version changed."""
        return self.controller.sync_once()

    def lora_request(self, name: str) -> LoRARequest:
        """The LoRARequest serving ``name`` ("lora1" or "lora1@<version>") right now."""
        adapter, version = split_served_name(name)
        if version is not None and name not in self.engine.routes:
            self.controller.ensure(adapter, version)
        elif version is not None:
            self.controller.touch(adapter, version)
        try:
            return self.engine.routes[name]
        except KeyError:
            raise NotFoundError(f"{name!r} is not served: no READY version of it in {self.settings.root}") from None

    def status(self) -> InstanceRecord:
        return self.controller.status()
