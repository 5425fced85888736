"""Records engines write into the store: instance heartbeats and version failures.

Records are parsed with pydantic, so a damaged or hostile file is a clear
error for that file alone and never takes down a reader.
"""

from __future__ import annotations

import fnmatch
import time

from pydantic import BaseModel, ConfigDict, Field

PHASES = ("detect", "validate", "stage", "install", "probe", "switch")
# Where a stage's time goes, each worker reporting it with its status (a swap's timings carry
# the slowest rank's): the weight file read and hashed, vLLM's loader building the adapter
# from those bytes, the NaN/inf and shape checks with q/k/v packing and scaling, the copy
# into a free slot.
STAGE_PHASES = ("stage_read", "stage_load", "stage_check", "stage_slot")
STALE_AFTER_POLLS = 3.0


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore")


class SwapRecord(_Record):
    """One swap attempt on one instance."""

    version: str
    result: str  # "served" | "failed"
    mode: str = "versioned"
    phase: str | None = None  # where it failed
    error: str | None = None
    # phase -> seconds, plus "engine_stall": how long the install held the engine loop (worker side)
    timings: dict[str, float] = Field(default_factory=dict)
    finished_at: float = 0.0


class AdapterServing(_Record):
    """What one instance does with one adapter."""

    served_version: str | None = None
    installed_versions: list[str] = Field(default_factory=list)
    state: str = "idle"  # serving | swapping | failed | no-slot | waiting | retired
    phase: str | None = None  # while swapping: the step its transaction is in
    last_swap: SwapRecord | None = None
    last_error: str | None = None


class InstanceRecord(_Record):
    """``<root>/.instances/<instance-id>.json``, rewritten by each engine on every poll."""

    instance_id: str
    url: str | None = None
    host: str = ""
    pid: int = 0
    vllm_version: str = ""
    plugin_version: str = ""
    started_at: float = 0.0
    heartbeat: float = 0.0
    poll_interval: float = 5.0
    mode: str = "versioned"
    follows: list[str] = Field(default_factory=list)  # VLLM_HOTSWAP_ADAPTERS: names or globs; empty: unknown
    weight_version: str | None = None
    adapters: dict[str, AdapterServing] = Field(default_factory=dict)
    last_error: str | None = None

    def follows_adapter(self, adapter: str) -> bool:
        """Whether this instance follows ``adapter`` (True when the record predates ``follows``)."""
        return not self.follows or any(fnmatch.fnmatchcase(adapter, pattern) for pattern in self.follows)

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.heartbeat

    def is_stale(self, now: float | None = None) -> bool:
        """No heartbeat for a few poll intervals: the instance is down or cut off."""
        return self.age(now) > max(STALE_AFTER_POLLS * self.poll_interval, 2.0)


class FailureRecord(_Record):
    """``<adapter>/<version>/FAILED.<instance-id>.json``: why an instance refused a version."""

    instance_id: str
    phase: str
    reason: str
    at: float = 0.0
