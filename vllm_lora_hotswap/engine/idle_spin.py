"""How long an idle vLLM process busy-polls before it sleeps (``VLLM_HOTSWAP_IDLE_SPIN``).

Why: vLLM's processes talk through shared-memory queues, and a reader keeps
polling its queue for a second after every message (``SpinCondition``,
``busy_loop_s=1``) before it sleeps on a socket. Under load that saves a wake-up
per step. Between the steps of an RL loop it burns a core per worker for a
second after every step, and a trainer or a second engine on the same cores
gets what is left: with two engines on two cores, the trainer's save and
commit of each policy sync took two to three times longer than with the spin cut
short (``python -m benchmarks.policy_sync``; the figures are in
``benchmarks/results/policy_sync.md``, where the engines run with this setting).

How: every queue reader vLLM creates after the plugin is registered (the
engine core's, each worker's) gets ``busy_loop_s`` set to the setting. After
that much idle time the reader waits on the socket vLLM's writer notifies at
every message: vLLM's own idle mode, entered sooner. What it costs: a step that
follows the previous one by more than the setting starts after a socket
wake-up (tens of microseconds) instead of at once; back-to-back steps under
load never reach it. Unset, vLLM's second stands.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

logger = logging.getLogger("vllm.lora_hotswap")


def install_idle_spin(seconds: float) -> None:
    """Make every shared-memory queue reader created from now on sleep after ``seconds`` idle."""
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    original = SpinCondition.__init__
    if getattr(original, "_hotswap_idle_spin", None) is not None:
        original = original.__wrapped__

    @functools.wraps(original)
    def __init__(self: Any, is_reader: bool, *args: Any, **kwargs: Any) -> None:
        original(self, is_reader, *args, **kwargs)
        if is_reader:
            self.busy_loop_s = seconds

    __init__._hotswap_idle_spin = seconds  # type: ignore[attr-defined]
    SpinCondition.__init__ = __init__
    logger.debug("hot-swap: idle vLLM processes busy-poll for %.3f s, then sleep", seconds)
