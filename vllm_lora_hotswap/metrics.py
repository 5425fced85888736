"""Prometheus metrics, served on the vLLM server's own ``/metrics``.

vLLM exposes the default ``prometheus_client`` registry of the API-server
process, where the swap pipeline runs, so registering there is enough.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from .store.records import PHASES, SwapRecord

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class HotSwapMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.swaps = Counter(
            "vllm_hotswap_swaps",
            "Adapter version swaps by result (served, failed, waiting).",
            ["adapter", "result"],
            registry=registry,
        )
        self.phase_seconds = Histogram(
            "vllm_hotswap_phase_seconds",
            "Seconds spent in each swap phase.",
            ["adapter", "phase"],
            buckets=_BUCKETS,
            registry=registry,
        )
        self.served_version = Gauge(
            "vllm_hotswap_served_version",
            "1 for the version each adapter serves.",
            ["adapter", "version"],
            registry=registry,
        )
        self.installed_versions = Gauge(
            "vllm_hotswap_installed_versions",
            "Adapter versions holding a LoRA slot (current, retiring, pinned).",
            registry=registry,
        )
        self.staged_bytes = Gauge(
            "vllm_hotswap_staged_bytes",
            "Host bytes of staged adapter weights, summed over workers.",
            registry=registry,
        )
        self.weight_version = Gauge(
            "vllm_hotswap_weight_version",
            "1 for the base-weight version the engine holds.",
            ["version"],
            registry=registry,
        )
        self.probe_generations = Counter(
            "vllm_hotswap_probe_generations",
            "Probe verdicts by where their token came from: first_batch (the first pinned sample "
            "generation of callers that waited to sample the version) or own (a generation of its own).",
            ["source"],
            registry=registry,
        )
        self._served: dict[str, str] = {}
        self._weights: str | None = None

    def swap(self, adapter: str, record: SwapRecord) -> None:
        self.swaps.labels(adapter, record.result).inc()
        for phase, seconds in record.timings.items():
            if phase in PHASES:
                self.phase_seconds.labels(adapter, phase).observe(seconds)

    def probed(self, source: str) -> None:
        self.probe_generations.labels(source).inc()

    def served(self, adapter: str, version: str | None) -> None:
        old = self._served.pop(adapter, None)
        if old is not None:
            self.served_version.remove(adapter, old)
        if version is not None:
            self._served[adapter] = version
            self.served_version.labels(adapter, version).set(1)

    def installed(self, versions: int, staged_bytes: int) -> None:
        self.installed_versions.set(versions)
        self.staged_bytes.set(staged_bytes)

    def weights(self, version: str) -> None:
        if self._weights is not None:
            self.weight_version.remove(self._weights)
        self._weights = version
        self.weight_version.labels(version).set(1)
