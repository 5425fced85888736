"""The soak's measurements and its one-line summary.

Each part of the soak (swaps under streaming load, publications without clients)
records its counts and, every few swaps, the RSS of each server process and the size
of ``GET /metrics``. Growth is measured from the first sample at 10% of a part's
swaps to its last sample, for each process; the summary reports the worst.
``make soak`` ends with :meth:`SoakReport.line` (printed by ``tests/conftest.py``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import psutil

from hotswap_devkit.server import VllmServer

ROLES = ("api_server", "engine_core", "worker")


_MARKS = (("engine_core", "EngineCore"), ("worker", "Worker"))  # vLLM's process titles


def process_rss(server: VllmServer) -> dict[str, int]:
    """RSS in bytes of ``server``'s processes, by process role (multiprocessing's resource
    tracker left out)."""
    assert server.process is not None
    rss: dict[str, int] = {}
    for process in server.processes():
        with contextlib.suppress(psutil.NoSuchProcess):
            title = process.name()
            api_server = process.pid == server.process.pid
            role = "api_server" if api_server else next((r for r, mark in _MARKS if mark in title), None)
            if role is not None:
                rss[role] = rss.get(role, 0) + process.memory_info().rss
    return rss


@dataclass
class Sample:
    swaps: int
    rss: dict[str, int]
    metrics_bytes: int


@dataclass
class SoakPart:
    name: str
    planned: int  # swaps the part will make: its 10% mark
    swaps: int = 0
    failures: int = 0
    mixed: int = 0
    samples: list[Sample] = field(default_factory=list)

    def sample(self, swaps: int, rss: dict[str, int], metrics_bytes: int) -> None:
        self.samples.append(Sample(swaps, rss, metrics_bytes))

    def window(self) -> tuple[Sample, Sample] | None:
        """The first sample at 10% of the part or later, and the last one."""
        start = next((s for s in self.samples if s.swaps >= self.planned / 10), None)
        return None if start is None or start is self.samples[-1] else (start, self.samples[-1])

    def rss_growth_pct(self) -> dict[str, float]:
        window = self.window()
        if window is None:
            return {}
        first, last = window
        return {
            role: 100 * (last.rss[role] / first.rss[role] - 1)
            for role in ROLES
            if role in first.rss and role in last.rss
        }

    def metrics_bytes_growth_pct(self) -> float | None:
        window = self.window()
        return None if window is None else 100 * (window[1].metrics_bytes / window[0].metrics_bytes - 1)

    def describe(self) -> str:
        window = self.window()
        if window is None:
            return f"{self.name}: too few samples"
        first, last = window
        rss = ", ".join(
            f"{r} {first.rss[r] >> 20}->{last.rss[r] >> 20} MiB" for r in ROLES if r in first.rss and r in last.rss
        )
        return (
            f"{self.name}: swaps {first.swaps}->{last.swaps}: {rss}; "
            f"/metrics {first.metrics_bytes}->{last.metrics_bytes} bytes"
        )


@dataclass
class SoakReport:
    parts: list[SoakPart] = field(default_factory=list)
    instance_records: int | None = None

    def part(self, name: str, planned: int) -> SoakPart:
        part = SoakPart(name, planned)
        self.parts.append(part)
        return part

    def line(self) -> str:
        rss = [g for part in self.parts for g in part.rss_growth_pct().values()]
        metrics = [g for part in self.parts if (g := part.metrics_bytes_growth_pct()) is not None]
        return (
            f"soak: swaps={sum(p.swaps for p in self.parts)} failures={sum(p.failures for p in self.parts)} "
            f"mixed={sum(p.mixed for p in self.parts)} rss_growth_pct={_pct(rss)} "
            f"metrics_bytes_growth_pct={_pct(metrics)} instance_records={self.instance_records}"
        )


def _pct(values: list[float]) -> str:
    return f"{max(values):.2f}" if values else "n/a"


REPORT = SoakReport()
