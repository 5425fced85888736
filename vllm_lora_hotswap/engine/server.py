"""The swap pipeline's engine for a served vLLM (``AsyncLLM`` behind the OpenAI server).

The controller runs in its own thread; every call here hops onto the API
server's event loop (where ``AsyncLLM`` and the routing table live) and waits
for the result, so the loop itself never blocks on the store or on a swap.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, TypeVar

from vllm.sampling_params import SamplingParams

from ..pipeline.engine_api import EngineUnavailable, LoraHandle
from ..settings import HotSwapSettings
from .stage_channel import ServerChannel
from .worker_rpc import WorkerRpcEngine, probe_token_ids

if TYPE_CHECKING:
    from ..metrics import HotSwapMetrics

T = TypeVar("T")
logger = logging.getLogger("vllm.lora_hotswap")
RPC_TIMEOUT = 120.0
ABORT_WAIT_S = 30.0  # for sample requests on a version that failed its probe to end
REFUSED_KEPT = 64  # recently refused served names remembered for late sample requests
# How long a probe waits for the batch that a caller released by ``wait?sampling=1`` is about
# to send (its HTTP round trip, or a rollout loop's next wait and batch); past that the probe
# runs a generation of its own, which costs about as much as this wait could save.
BATCH_ARRIVAL_WAIT_S = 0.1
FIRST_OUTPUT_WAIT_S = 60.0  # a guard: a batch that ends without a token resolves it at once


@dataclass
class SamplingGate:
    """A version that sample requests pinning it may use while its probe runs (loop only).

    Their generations start beside the probe, in the same engine step, instead of a
    step later; their answers wait for ``verdict``. A failed verdict aborts them first,
    so no rollout is ever answered from a version that did not pass."""

    request: Any  # the version's LoRARequest
    verdict: asyncio.Future[bool]
    # The first token of the first sample request pinning the version (a CompletionOutput
    # with its logprob): the probe's evidence when callers waited to sample the version.
    first_output: asyncio.Future[Any]
    batch_expected: bool = False  # callers wait (or lately waited) to sample the adapter as the gate opened
    batch_arrived: asyncio.Event = field(default_factory=asyncio.Event)
    request_ids: set[str] = field(default_factory=set)

    def sampled(self, output: Any) -> None:
        """A pinned sample produced ``output`` (a CompletionOutput): the first with a token is
        the probe's evidence."""
        if output.token_ids and not self.first_output.done():
            self.first_output.set_result(output)

    def ended(self, request_id: str) -> None:
        """A pinned sample generation ended; the last one to end without any token having
        been produced leaves the probe to a generation of its own."""
        self.request_ids.discard(request_id)
        if not self.request_ids and not self.first_output.done():
            self.first_output.set_result(None)


class ServerEngine(WorkerRpcEngine):
    # Concurrent probe calls need not wait for each other: the engine core takes every
    # request that arrived during a step into its next one.
    probes_overlap = True

    def __init__(
        self,
        engine_client: Any,
        models: Any,
        loop: asyncio.AbstractEventLoop,
        settings: HotSwapSettings,
        metrics: HotSwapMetrics | None = None,
    ):
        self.client = engine_client
        self.metrics = metrics
        self.models = models  # OpenAIServingModels: lora_requests is the routing table
        self.loop = loop
        self.settings = settings
        self.limits()  # refuses a server without --enable-lora
        self._held: dict[str, asyncio.Event] = {}  # adapter -> set when its probe's verdict is in (loop only)
        self._gates: dict[str, SamplingGate] = {}  # served name -> gate, while its probe runs (loop only)
        # Served names whose probe failed while open to samples, newest last (loop only): a
        # sample request that saw the gate open and arrives after the verdict gets the same 409.
        self._refused: OrderedDict[str, None] = OrderedDict()
        self.gate_listeners: list[
            Callable[[str], bool | None]
        ] = []  # called with the adapter when a gate opens (loop)
        tokenizer = getattr(engine_client.renderer, "tokenizer", None)
        self._probe_ids = probe_token_ids(tokenizer, settings.probe_prompt)

    # -- plumbing ----------------------------------------------------------------------
    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = RPC_TIMEOUT) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _rpc(self, method: str, *args: Any) -> list[Any]:
        return self._timed_rpc(method, *args)[0]

    def _timed_rpc(self, method: str, *args: Any) -> tuple[list[Any], float | None]:
        return self._call(self._timed_rpc_async(method, *args))

    async def _timed_rpc_async(self, method: str, *args: Any) -> tuple[list[Any], float | None]:
        """``method`` on every worker of every engine core: one result per worker, and the
        longest time an engine core was held by it (None for an in-process engine core).

        ``AsyncLLM.collective_rpc`` reaches only the first engine core of a data-parallel
        server (vLLM returns the first engine's answer alone), so a stage or install that
        failed on another replica would go unseen; the call goes to each core instead."""
        core = self.client.engine_core
        if not hasattr(core, "call_utility_all_async"):  # in-process engine core: one engine
            return await self.client.collective_rpc(method, timeout=RPC_TIMEOUT, args=args), None
        per_engine = await core.call_utility_all_async("hotswap_timed_rpc", method, RPC_TIMEOUT, args)
        workers = [result for engine in per_engine for result in engine["results"]]
        return workers, max(engine["held_s"] for engine in per_engine)

    async def open_stage_channel(self) -> None:
        """Stage requests and reports go straight between this process and the workers."""
        try:
            channel = ServerChannel()
        except OSError as exc:
            logger.warning("hot-swap: no stage channel (%s); staging by RPC", exc)
            return
        paths, _ = await self._timed_rpc_async("hotswap_channel", str(channel.directory))
        if channel.connect(paths):
            self.channel = channel
            atexit.register(channel.close)
        else:
            channel.close()

    def _vllm_config(self) -> Any:
        return self.client.vllm_config

    # -- the rest of EngineAdapter -----------------------------------------------------
    def new_lora_id(self) -> int:
        return self.models.lora_id_counter.inc(1)

    async def _generate_probes(self, lora_requests: Sequence[Any]) -> list[Any]:
        """One probe generation per LoRA request (None: the base model), sent to the engine
        back to back: every prompt is rendered first, so no request waits for another's
        rendering and the engine core finds as many of them as possible in its queue at
        its next step. A generation that raised is returned as its exception."""
        params = SamplingParams(
            max_tokens=self.settings.probe_max_tokens, temperature=0.0, ignore_eos=True, logprobs=0, detokenize=False
        )
        prompts = await self.client.renderer.render_cmpl_async(
            [{"prompt_token_ids": list(self._probe_ids)} for _ in lora_requests]
        )

        async def generate(prompt: Any, lora_request: Any) -> Any:
            if (first := await self._first_batch_output(lora_request)) is not None:
                self._count_probe("first_batch")
                return SimpleNamespace(outputs=[first])
            if lora_request is not None:  # not the start-up warm-up
                self._count_probe("own")
            final = None
            async for output in self.client.generate(
                prompt, params, f"hotswap-probe-{uuid.uuid4().hex}", lora_request=lora_request
            ):
                final = output
            return final

        return await asyncio.gather(*map(generate, prompts, lora_requests), return_exceptions=True)

    def _count_probe(self, source: str) -> None:
        if self.metrics is not None:
            self.metrics.probed(source)

    async def _first_batch_output(self, lora_request: Any) -> Any:
        """The probe beside the first batch: when callers waited to sample the version, its
        first pinned sample generation is the probe (the same finite-logprob check on its first
        token), so the version costs no engine step of its own on the RL path. None: no batch
        came within ``BATCH_ARRIVAL_WAIT_S``, or it ended without a token; probe as usual."""
        gate = self._gates.get(getattr(lora_request, "lora_name", None) or "")
        if gate is None or not gate.batch_expected:
            return None
        try:
            await asyncio.wait_for(gate.batch_arrived.wait(), BATCH_ARRIVAL_WAIT_S)
            return await asyncio.wait_for(asyncio.shield(gate.first_output), FIRST_OUTPUT_WAIT_S)
        except TimeoutError:
            return None

    async def warm_up(self) -> None:
        """One probe on the base model at start-up: vLLM compiles its log-probability path
        on first use (~5 s on CPU), which would otherwise land on the first swap's probe."""
        started = time.perf_counter()
        try:
            (result,) = await self._generate_probes([None])
        except Exception as exc:
            result = exc
        if isinstance(result, BaseException):  # the first real probe will say what is wrong
            logger.warning("hot-swap: probe warm-up failed: %s: %s", type(result).__name__, result)
            return
        logger.info("hot-swap: probe path warmed up in %.1f s", time.perf_counter() - started)

    def probe(self, handles: Sequence[LoraHandle]) -> list[Exception | None]:
        """Probe generations for ``handles``, submitted together. A generation that raised
        (engine dead, paused for a base-weight update, timed out) is the engine's trouble,
        not a verdict on the version."""
        verdicts: list[Exception | None] = []
        for final in self._call(self._generate_probes([self.lora_request(h) for h in handles])):
            if isinstance(final, BaseException):
                verdicts.append(EngineUnavailable(f"probe generation raised {type(final).__name__}: {final}"))
            else:
                verdicts.append(self.probe_verdict(final.outputs[0] if final is not None and final.outputs else None))
        return verdicts

    def hold_requests(self, adapter: str) -> None:
        # Scheduled, not awaited: it reaches the loop before the probe this precedes.
        if self.settings.probe_hold > 0:
            self.loop.call_soon_threadsafe(lambda: self._held.setdefault(adapter, asyncio.Event()))

    def release_requests(self, adapter: str) -> None:
        def release() -> None:
            held = self._held.pop(adapter, None)
            if held is not None:
                held.set()

        self.loop.call_soon_threadsafe(release)  # after a route made with _call: it is in place

    async def wait_if_held(self, model: str) -> None:
        """A request naming ``model`` waits while a new version of that adapter is probed
        (at most ``VLLM_HOTSWAP_PROBE_HOLD`` seconds), then goes where the routes say."""
        held = self._held.get(model)
        if held is not None:
            try:
                await asyncio.wait_for(held.wait(), self.settings.probe_hold)
            except TimeoutError:
                pass

    def open_for_sampling(self, handle: LoraHandle) -> None:
        request = self.lora_request(handle)

        async def apply() -> None:  # in place before the probe starts
            gate = SamplingGate(request, self.loop.create_future(), self.loop.create_future())
            self._gates[handle.served_name] = gate
            # A listener answers whether it released a caller waiting to sample the adapter.
            gate.batch_expected = any([bool(listener(handle.adapter)) for listener in self.gate_listeners])

        self._call(apply())

    def close_for_sampling(self, handle: LoraHandle, *, passed: bool) -> None:
        async def apply() -> None:
            gate = self._gates.pop(handle.served_name, None)
            if gate is None:
                return
            if not gate.verdict.done():
                gate.verdict.set_result(passed)
            if not passed:
                self._refused[handle.served_name] = None
                while len(self._refused) > REFUSED_KEPT:
                    self._refused.popitem(last=False)
            # Aborted, and ended, before the slot is freed: the engine core takes an abort
            # before the removal that follows it on the same queue. A request that was
            # starting as the verdict came is aborted once it has started.
            deadline = time.monotonic() + ABORT_WAIT_S
            while not passed and gate.request_ids and time.monotonic() < deadline:
                await self.client.abort(list(gate.request_ids))
                await asyncio.sleep(0.01)

        self._call(apply())

    def sampling_gate(self, served_name: str) -> SamplingGate | None:
        """The gate of a version being probed that sample requests may pin (loop only)."""
        return self._gates.get(served_name)

    def refused_for_sampling(self, served_name: str) -> bool:
        """Whether ``served_name`` recently failed its probe while open to samples (loop only)."""
        return served_name in self._refused

    def route(self, handle: LoraHandle, *, current: bool) -> None:
        request = self.lora_request(handle)

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
