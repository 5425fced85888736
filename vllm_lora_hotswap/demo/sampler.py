"""The serving half of the demo: sample the served adapter and score it with the trainer's reward."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from rich.console import Console


@dataclass
class Sample:
    at: float
    served_by: str  # "base" or the adapter version that generated it
    reward: float


class ServedRewardSampler(threading.Thread):
    """Every ``interval`` seconds: a batch of completions from ``adapter`` (the base model until the
    adapter exists), scored with ``reward``; prints one line each time a new version answers."""

    def __init__(self, url: str, adapter: str, base_model: str, prompts: Sequence[str], reward: Any,
                 console: Console, interval: float = 1.0):  # fmt: skip
        super().__init__(name="demo-sampler", daemon=True)
        self.url, self.adapter, self.base_model = url, adapter, base_model
        self.prompts, self.reward, self.console, self.interval = list(prompts), reward, console, interval
        self.samples: list[Sample] = []
        self.swaps: list[tuple[float, str]] = []  # (first time served, version)
        self.errors: list[str] = []
        self._stopping = threading.Event()
        self._http = httpx.Client(timeout=60)

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join(30)

    def run(self) -> None:
        while not self._stopping.wait(self.interval):
            try:
                self._sample()
            except Exception as exc:  # busy or restarting: try again at the next tick, say why once
                if not self.errors:
                    self.console.print(f"  [yellow]sampling failed ({type(exc).__name__}: {exc}); retrying[/yellow]")
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def _sample(self) -> None:
        body = {"prompt": self.prompts, "max_tokens": 8, "temperature": 1.0, "return_token_ids": True}
        response = self._http.post(f"{self.url}/v1/completions", json={"model": self.adapter, **body})
        if response.status_code == 404:  # nothing published yet
            response = self._http.post(f"{self.url}/v1/completions", json={"model": self.base_model, **body})
        response.raise_for_status()
        data = response.json()
        served_by = data["model"].partition("@")[2] if "@" in data["model"] else "base"
        reward = sum(self.reward.score(c["token_ids"]) for c in data["choices"]) / len(data["choices"])
        now = time.time()
        self.samples.append(Sample(now, served_by, reward))
        if served_by != "base" and served_by not in {v for _, v in self.swaps}:
            self.swaps.append((now, served_by))
            self.console.print(f"  swap → [cyan]{self.adapter}@{served_by}[/cyan]: served reward {reward:.2f}")

    def status_line(self) -> str:
        if not self.samples:
            return "-"
        last = self.samples[-1]
        return f"{last.reward:.2f} ({'base' if last.served_by == 'base' else 'v' + last.served_by[11:]})"

    def wait_for_version(self, version: str | None, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while version is not None and time.monotonic() < deadline:
            if any(v == version for _, v in self.swaps):
                return
            time.sleep(0.2)
