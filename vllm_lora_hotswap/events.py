"""Swap events: every outcome is a log line and an event subscribers receive.

In-process subscribers (``subscribe``) get each event as it happens; other
processes (the fleet scheduler) read the bounded history through
``GET /v1/lora/events`` on each instance.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, Field

logger = logging.getLogger("vllm.lora_hotswap")


class SwapEvent(BaseModel):
    """What happened to one adapter version on one instance."""

    seq: int = 0
    kind: Literal["updated", "failed", "retired"]
    adapter: str
    version: str | None
    instance_id: str
    at: float = Field(default_factory=time.time)
    error_message: str | None = None
    phase: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)


class EventBus:
    """Fan-out to subscribers plus a bounded, sequence-numbered history."""

    def __init__(self, history: int = 1000):
        self._subscribers: list[Callable[[SwapEvent], None]] = []
        self._history: deque[SwapEvent] = deque(maxlen=history)
        self._seq = itertools.count(1)
        self._lock = threading.Lock()

    def subscribe(self, callback: Callable[[SwapEvent], None]) -> None:
        self._subscribers.append(callback)

    def emit(self, event: SwapEvent) -> None:
        with self._lock:
            event = event.model_copy(update={"seq": next(self._seq)})
            self._history.append(event)
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:  # a subscriber's bug must not stop swaps
                logger.exception("hot-swap event subscriber %r failed", callback)

    def since(self, seq: int) -> list[SwapEvent]:
        with self._lock:
            return [e for e in self._history if e.seq > seq]
