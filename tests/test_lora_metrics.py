"""vLLM's ``vllm:lora_requests_info`` label sets: by adapter, in name order."""

from __future__ import annotations

from vllm.v1.metrics.stats import LoRARequestStates, SchedulerStats

from vllm_lora_hotswap.engine.lora_metrics import count_requests_by_adapter


def _labels(arrivals: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    count_requests_by_adapter()
    states = LoRARequestStates(log_stats=True)
    for k, name in enumerate(arrivals):
        states.request_running(f"req-{k}", name)
    stats = SchedulerStats()
    states.update_scheduler_stats(stats)
    return dict(stats.running_lora_adapters), dict(stats.waiting_lora_adapters)


def test_versions_count_under_their_adapter_listed_in_name_order_whatever_the_arrival_order() -> None:
    running, waiting = _labels(["b@v2", "a@v1", "b@v3", "c"])
    assert list(running) == ["a", "b", "c"], "vLLM joins these keys into the label, in this order"
    assert running == {"a": 1, "b": 2, "c": 1}
    assert list(waiting) == ["a", "b", "c"]
    # The same adapters in another arrival order give the same label set, not a new series.
    assert list(_labels(["c", "b@v9", "a@v8"])[0]) == ["a", "b", "c"]
