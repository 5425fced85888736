"""What every benchmark shares: a vLLM server subprocess, streaming clients,
statistics and progress lines.

The server is the dev kit's (``hotswap_devkit.server``), shared with the tests.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from hotswap_devkit.server import VllmServer
from vllm_lora_hotswap.store import CheckpointStore

from .assets import Assets

PROMPT = "the quick brown fox jumps over the lazy dog"
# Bench-model serving arguments. Host slots (--max-cpu-loras) for every adapter
# shape at once, each holding two versions while the old one retires, plus the
# native baseline's adapters on the same server; batch slots (--max-loras) for
# the versions that serving under swaps keeps in flight at once.
SERVER_ARGS = (
    "--enable-lora",
    "--max-lora-rank",
    "64",
    "--max-loras",
    "8",
    "--max-cpu-loras",
    "32",
    "--dtype",
    "float32",
    "--max-model-len",
    "512",
    "--enforce-eager",
    "--max-num-seqs",
    "32",
)


EVENTS_POLL_S = 5.0  # the events servers' poll, behind inotify


def plugin_server(
    assets: Assets, tmp: Path, name: str, *, events: bool, poll_s: float, extra_args: list[str], probe: bool = True
) -> tuple[Server, CheckpointStore]:
    root = tmp / f"store-{name}"
    root.mkdir(parents=True)
    env = {
        "VLLM_HOTSWAP_ROOT": str(root),
        "VLLM_HOTSWAP_EVENTS": "1" if events else "0",
        "VLLM_HOTSWAP_POLL_INTERVAL": str(poll_s),
        "VLLM_HOTSWAP_PROBE": "1" if probe else "0",
        # Short (default 5 s), so back-to-back swaps do not wait long for the old
        # version's slot; still ample for a routed request to reach the local engine.
        "VLLM_HOTSWAP_RETIRE_GRACE": "0.25",
        # The native baseline on the same server (the plugin leaves that route alone).
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
    }
    return Server(assets.model, tmp / f"{name}.log", env, extra_args), CheckpointStore(root)


class Server(VllmServer):
    """The dev kit's server with the benchmarks' serving arguments and no test defaults."""

    def __init__(self, model: Path, log_path: Path, env: dict[str, str], args: Sequence[str] = ()):
        super().__init__(
            model, None, log_path, env=env, args=args, base_args=SERVER_ARGS, defaults={}, start_timeout=400
        )


# -- streaming clients -------------------------------------------------------------------
@dataclass
class Stream:
    """One streamed completion: arrival time (``time.time()``) and token count of every chunk with tokens."""

    started: float
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    model: str = ""

    @property
    def tokens(self) -> int:
        return sum(self.chunk_tokens)

    def gaps(self) -> list[tuple[float, float]]:
        """Inter-token gaps as (previous arrival, this arrival); the first token (TTFT) is not one."""
        return list(zip(self.chunk_times, self.chunk_times[1:]))


class StreamLoad:
    """Concurrent clients, each streaming completions back to back (client *i*
    asks for ``max_tokens[i]`` tokens, ignoring EOS, and starts ``i * stagger_s``
    seconds after the first, so that the clients do not prefill in lockstep).

    Runs on an asyncio loop in its own thread so the benchmark's main thread
    can publish and poll meanwhile. Leaving the context cancels the requests in
    flight (vLLM aborts them) instead of waiting for them to finish.
    """

    def __init__(self, url: str, model: str, max_tokens: Sequence[int], stagger_s: float = 0.0):
        self.url = url
        self.model = model
        self.max_tokens = tuple(max_tokens)
        self.stagger_s = stagger_s
        self.clients = len(self.max_tokens)
        self.streams: list[Stream] = []  # appended when a request starts, filled as it streams
        self.errors: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clients_task: asyncio.Future[Any] | None = None
        self._running = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="stream-load", daemon=True)

    def __enter__(self) -> StreamLoad:
        self._thread.start()
        self._running.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._clients_task is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._clients_task.cancel)
        self._thread.join(60)

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        limits = httpx.Limits(max_connections=self.clients + 2)
        async with httpx.AsyncClient(base_url=self.url, timeout=300, limits=limits) as client:
            self._clients_task = asyncio.gather(
                *(self._client(client, tokens, i * self.stagger_s) for i, tokens in enumerate(self.max_tokens))
            )
            self._running.set()
            try:
                await self._clients_task
            except asyncio.CancelledError:
                pass

    async def _client(self, client: httpx.AsyncClient, max_tokens: int, delay: float) -> None:
        body = {
            "model": self.model,
            "prompt": PROMPT,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "return_token_ids": True,
        }
        await asyncio.sleep(delay)
        while True:
            stream = Stream(started=time.time())
            self.streams.append(stream)
            try:
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    response.raise_for_status()
                    pending = ""
                    # Not aiter_lines: it also splits at U+2028 or \x85, which vLLM's JSON
                    # may carry unescaped in generated text.
                    async for text in response.aiter_text():
                        *lines, pending = (pending + text).split("\n")
                        now = time.time()
                        for line in lines:
                            if not line.startswith("data: {"):
                                continue
                            chunk = json.loads(line[6:])
                            tokens = len(chunk["choices"][0].get("token_ids") or [])
                            if tokens:
                                stream.chunk_times.append(now)
                                stream.chunk_tokens.append(tokens)
                                stream.model = chunk.get("model", stream.model)
            except httpx.HTTPError as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.1)

    def wait_warm(self, timeout: float = 120) -> None:
        """Return once every client has received tokens (the batch is in steady state)."""
        deadline = time.monotonic() + timeout
        while sum(1 for s in list(self.streams) if s.tokens) < self.clients and time.monotonic() < deadline:
            time.sleep(0.1)


def gaps_between(streams: Iterable[Stream], start: float, end: float) -> list[float]:
    """Inter-token gaps that overlap [start, end], in seconds."""
    return [b - a for s in streams for a, b in s.gaps() if b >= start and a <= end]


def gaps_outside(streams: Iterable[Stream], windows: Sequence[tuple[float, float]]) -> list[float]:
    """Inter-token gaps that overlap none of ``windows``."""
    return [b - a for s in streams for a, b in s.gaps() if not any(b >= start and a <= end for start, end in windows)]


# -- statistics and output ---------------------------------------------------------------
def summary(values: Sequence[float]) -> dict[str, float]:
    """n, mean, p50, p95, p99, max of ``values`` (empty: n=0 only)."""
    if not values:
        return {"n": 0}
    data = np.asarray(values, dtype=float)
    return {
        "n": int(data.size),
        "mean": float(data.mean()),
        "p50": float(np.percentile(data, 50)),
        "p95": float(np.percentile(data, 95)),
        "p99": float(np.percentile(data, 99)),
        "max": float(data.max()),
    }


class Progress:
    """A compact ``label i/n`` that rewrites itself on a terminal and prints
    only a few lines (every 25%) into a log."""

    def __init__(self, label: str, total: int):
        self.label = label
        self.total = total
        self.done = 0
        self.tty = sys.stdout.isatty()
        self._quarters = 0

    def advance(self) -> None:
        self.done += 1
        if self.tty:
            end = "\n" if self.done >= self.total else ""
            print(f"\r    {self.label} {self.done}/{self.total}", end=end, flush=True)
        elif self.done * 4 >= (self._quarters + 1) * self.total:
            self._quarters = self.done * 4 // self.total
            print(f"    {self.label} {self.done}/{self.total}", flush=True)


def stage(title: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {title}", flush=True)
