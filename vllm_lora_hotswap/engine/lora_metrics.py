"""Keep vLLM's ``vllm:lora_requests_info`` series bounded by adapters, not versions.

vLLM labels that gauge with the names of the LoRAs that have waiting and running
requests, and never removes a label set. With a LoRA name per version
(``lora1@<version>``) the series would grow with every version an engine has
served: measured, about 190 bytes of ``/metrics`` per swap, 11,000 series after
10,000 versions. Requests are counted under their adapter's name instead, so
the series are those vLLM would have without hot-swapping.
"""

from __future__ import annotations

from typing import Any


def count_requests_by_adapter() -> None:
    from vllm.v1.metrics.stats import LoRARequestStates

    original = LoRARequestStates.update_scheduler_stats
    if getattr(original, "_lora_hotswap", False):
        return

    def update_scheduler_stats(self: Any, scheduler_stats: Any) -> None:
        original(self, scheduler_stats)
        if scheduler_stats is None:
            return
        for counts in (scheduler_stats.waiting_lora_adapters, scheduler_stats.running_lora_adapters):
            by_adapter: dict[str, int] = {}
            for name, count in counts.items():
                adapter = name.partition("@")[0]
                by_adapter[adapter] = by_adapter.get(adapter, 0) + count
            counts.clear()
            counts.update(by_adapter)

    update_scheduler_stats._lora_hotswap = True  # type: ignore[attr-defined]
    LoRARequestStates.update_scheduler_stats = update_scheduler_stats  # type: ignore[method-assign]
