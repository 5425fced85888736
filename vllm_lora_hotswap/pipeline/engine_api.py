"""What the swap pipeline needs from an inference engine, with no vLLM import.

``vllm_lora_hotswap.engine`` implements this protocol for a served vLLM
(``vllm serve``) and for an offline ``LLM``; the pipeline never touches vLLM.
All methods block; the pipeline calls them from its own thread.
"""

from __future__ import annotations

from dataclasses import dataclass
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
class EngineLimits:
    max_lora_rank: int
    max_loras: int  # adapters one step can use (device slots)
    max_cpu_loras: int  # adapters kept loaded (host cache)
    base_models: tuple[str, ...]  # names/paths the served base model goes by


@dataclass(frozen=True)
class StageStatus:
    state: str  # "pending" | "ready" | "failed"
    error: str | None = None
    nbytes: int = 0


class CheckpointRejected(Exception):
    """The engine refused a version (bad weights, failed probe): never serve it."""

    def __init__(self, phase: str, reason: str):
        super().__init__(f"{phase}: {reason}")
        self.phase = phase
        self.reason = reason


class NoCapacity(Exception):
    """No LoRA slot is free for another adapter version right now."""


class EngineAdapter(Protocol):
    def limits(self) -> EngineLimits: ...

    def new_lora_id(self) -> int: ...

    def stage(self, handle: LoraHandle) -> None:
        """Start reading ``handle``'s weights into host memory, off the engine loop."""

    def stage_status(self, handle: LoraHandle) -> StageStatus: ...

    def install(self, handle: LoraHandle, replace: LoraHandle | None) -> float:
        """Put a staged version into the LoRA manager between two steps, pinned.

        With ``replace``, the new weights take over ``replace``'s slot in place
        (same ``lora_id``). Returns seconds the engine loop was held.
        """

    def commit(self, handle: LoraHandle) -> None:
        """Forget what an in-place install kept for :meth:`restore`."""

    def restore(self, handle: LoraHandle) -> None:
        """Undo an in-place install: the replaced weights serve again."""

    def probe(self, handle: LoraHandle) -> None:
        """Short greedy generation; raises :class:`CheckpointRejected` if it is bad."""

    def route(self, handle: LoraHandle, *, current: bool) -> None:
        """Make ``adapter@version`` (and ``adapter`` when ``current``) serve ``handle``."""

    def unroute(self, adapter: str, version: str | None) -> None:
        """Stop routing ``adapter@version`` (or the bare ``adapter`` name when None)."""

    def in_flight(self, handle: LoraHandle) -> int:
        """Requests admitted with ``handle`` that have not finished."""

    def remove(self, handle: LoraHandle) -> None:
        """Free ``handle``'s slot and drop its staged copy."""
