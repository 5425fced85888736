"""What the swap pipeline needs from an inference engine, with no vLLM import.

``vllm_lora_hotswap.engine`` implements this protocol for a served vLLM
(``vllm serve``) and for an offline ``LLM``; the pipeline never touches vLLM.
All methods block; the pipeline calls them from its own threads, several at
once. The calls that reach the workers take a batch, so that versions ready at
the same moment cost one worker RPC (one step boundary), not one each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class LoraHandle:
    """One adapter version as the engine knows it.

    ``served_name`` is the LoRA name the engine sees (it keys the prefix cache
    together with ``path``); ``lora_id`` its integer slot id.
    """

    adapter: str
    version: str
    lora_id: int
    served_name: str
    path: str


@dataclass(frozen=True)
class InstallRequest:
    handle: LoraHandle
    replace: LoraHandle | None = None  # in place: the installed version whose slot ``handle`` takes


@dataclass(frozen=True)
class EngineLimits:
    max_lora_rank: int
    max_loras: int  # adapters one step can use (device slots)
    max_cpu_loras: int  # adapters kept loaded (host cache)
    base_models: tuple[str, ...]  # names/paths the served base model goes by
    # host-cache entries left to the adapters vLLM loads itself (engine/cache_room.py)
    kept_for_vllm: int = 0

    @property
    def cpu_loras_for_versions(self) -> int:
        """Host-cache entries the plugin's versions may hold."""
        return max(self.max_cpu_loras - self.kept_for_vllm, 0)

    def no_capacity(self) -> str:
        return no_capacity_message(self.max_cpu_loras, kept_for_vllm=self.kept_for_vllm)


def no_capacity_message(max_cpu_loras: int, *, kept_for_vllm: int = 0) -> str:
    """Why a version waits for a host slot (the scheduler's and the worker's words alike)."""
    kept = (
        f", less {kept_for_vllm} kept for the adapters vLLM loads itself: its load into a cache of pinned "
        "adapters stops the engine"
        if kept_for_vllm
        else ""
    )
    return f"all {max(max_cpu_loras - kept_for_vllm, 0)} LoRA slots (--max-cpu-loras {max_cpu_loras}{kept}) are in use"


@dataclass(frozen=True)
class StageStatus:
    state: str  # "pending" | "ready" | "failed"
    error: str | None = None
    nbytes: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # where a finished stage's time went (seconds)


class CheckpointRejected(Exception):
    """A verdict on the version itself (bad weights, wrong shapes, a probe that ran and
    produced non-finite logprobs): never serve it, on any engine."""

    def __init__(self, phase: str, reason: str):
        super().__init__(f"{phase}: {reason}")
        self.phase = phase
        self.reason = reason


class EngineUnavailable(Exception):
    """The engine could not do its part (dead, paused for a base-weight update, timed
    out). Says nothing about the version: retried later, never recorded as its failure."""


class NoCapacity(Exception):
    """No LoRA slot is free for another adapter version right now."""


class EngineAdapter(Protocol):
    # True when ``probe`` may run again before an earlier call returns and the engine
    # groups concurrent generations itself (a served vLLM); False: one call at a time.
    probes_overlap: bool
    # True when ``stage`` hashes each weight file against READY (and checks its shapes) in
    # the one read that loads it, failing the stage on a mismatch: validation then leaves
    # the weight file unread. Absent or False: validation reads and hashes it first.
    hashes_while_staging: bool
    # An engine may also have ``read_ahead(path, sha256, size) -> bool``: read a weight file a
    # publisher has just written, before its commit (``vllm_lora_hotswap.engine.read_ahead``).

    def limits(self) -> EngineLimits: ...

    def new_lora_id(self) -> int: ...

    def stage(self, handles: Sequence[LoraHandle]) -> None:
        """Start reading each handle's weights into host memory, off the engine loop."""

    def stage_status(self, handles: Sequence[LoraHandle]) -> list[StageStatus]: ...

    def wait_staged(self, handle: LoraHandle, timeout: float) -> None:
        """Return when ``handle``'s staging may have ended (a worker reported), or after at
        most ``timeout`` seconds; :meth:`stage_status` then says how it ended."""

    def install(self, requests: Sequence[InstallRequest]) -> list[float | Exception]:
        """Put staged versions into the LoRA manager at one step boundary, pinned.

        With ``replace``, the new weights take over ``replace``'s slot in place
        (same ``lora_id``). Per request: the seconds the engine loop was held, or
        the exception (:class:`NoCapacity`, :class:`CheckpointRejected`) for it.
        """

    def commit(self, handle: LoraHandle) -> None:
        """Forget what an in-place install kept for :meth:`restore`."""

    def restore(self, handle: LoraHandle) -> None:
        """Undo an in-place install: the replaced weights serve again."""

    def probe(self, handles: Sequence[LoraHandle]) -> list[Exception | None]:
        """Short greedy generations, run together. Per handle: None if it is good,
        :class:`CheckpointRejected` if it is bad, :class:`EngineUnavailable` if the
        engine could not tell."""

    def hold_requests(self, adapter: str) -> None:
        """Requests naming ``adapter`` that arrive from now on wait (up to a bound) for
        :meth:`release_requests`, and are then routed: to the probed version if it passed."""

    def release_requests(self, adapter: str) -> None:
        """Let the requests :meth:`hold_requests` holds go on; a no-op when none are held."""

    def open_for_sampling(self, handle: LoraHandle) -> None:
        """While ``handle`` is probed, let sample requests that pin it (``adapter@version``,
        as a rollout does) start at once, beside the probe; their answers wait for
        :meth:`close_for_sampling`. A no-op for an engine without such requests."""

    def close_for_sampling(self, handle: LoraHandle, *, passed: bool) -> None:
        """The probe's outcome for what :meth:`open_for_sampling` let start: passed, their
        answers go out; failed (or the version is not served after all), those requests
        are aborted and answered with an error, and have ended when this returns (so the
        version's slot can be freed)."""

    def route(self, handle: LoraHandle, *, current: bool) -> None:
        """Make ``adapter@version`` (and ``adapter`` when ``current``) serve ``handle``."""

    def unroute(self, adapter: str, version: str | None) -> None:
        """Stop routing ``adapter@version`` (or the bare ``adapter`` name when None)."""

    def in_flight(self, handle: LoraHandle) -> int:
        """Requests admitted under ``handle.served_name`` that have not finished."""

    def remove(self, handle: LoraHandle) -> None:
        """Free ``handle``'s slot (if it holds ``handle.path``) and drop its staged copy."""
