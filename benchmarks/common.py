"""What every benchmark shares: a vLLM server subprocess, streaming clients,
statistics and progress lines.

The server is a small equivalent of the tests' ``VllmServer`` so that the
benchmarks do not depend on ``tests/``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from vllm_lora_hotswap.store import CheckpointStore

from .assets import Assets

PROMPT = "the quick brown fox jumps over the lazy dog"
# Bench-model serving arguments. Host slots (--max-cpu-loras) for every adapter
# shape at once, each holding two versions while the old one retires, plus the
# native baseline's adapters on the same server; batch slots (--max-loras) for
# the versions that serving under swaps keeps in flight at once.
SERVER_ARGS = (
    "--enable-lora", "--max-lora-rank", "64", "--max-loras", "8", "--max-cpu-loras", "32",
    "--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--max-num-seqs", "32",
)  # fmt: skip


EVENTS_POLL_S = 5.0  # the events servers' poll, behind inotify


def plugin_server(assets: Assets, tmp: Path, name: str, *, events: bool, poll_s: float, extra_args: list[str],
                  probe: bool = True) -> tuple[Server, CheckpointStore]:  # fmt: skip
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``python -m vllm.entrypoints.openai.api_server`` as a subprocess (its own process group)."""

    def __init__(self, model: Path, log_path: Path, env: dict[str, str], args: Sequence[str] = ()):
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **env}
        self.args = [*SERVER_ARGS, *args]
        self.process: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def start(self, timeout: float = 400) -> Server:
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model), "--port", str(self.port), "--host", "127.0.0.1", *self.args,
        ]  # fmt: skip
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.process.returncode}; log: {self.log_path}")
            try:
                if self.http.get("/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vLLM server not healthy after {timeout:.0f}s; log: {self.log_path}")

    def stop(self, timeout: float = 30) -> None:
        """Stop the API server and every process it started (its process group), and wait
        until they are gone, so that their memory and files are released."""
        if self.process is None:
            return
        try:
            root = psutil.Process(self.process.pid)
            members = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            members = []
        _signal_group(self.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(_running(member) for member in members) and time.monotonic() < deadline + 10:
            self.process.poll()  # reap the API server
            if time.monotonic() > deadline:
                _signal_group(self.process.pid, signal.SIGKILL)
            time.sleep(0.2)
        self.process.wait(10)
        self.process = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- requests ----------------------------------------------------------------------
    def adapters(self) -> dict[str, Any]:
        return self.http.get("/v1/lora/adapters").json()["adapters"]

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = 120, interval: float = 0.05) -> None:
        # Not faster: on a small machine a tight status poll slows the swap it waits for.
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; log: {self.log_path}")
            time.sleep(interval)

    def wait_swapped(self, adapter: str, version: str, *, retired: bool = True, timeout: float = 120) -> dict[str, Any]:
        """Wait until ``adapter`` serves ``version`` (and, with ``retired``, no other version
        holds a slot); returns the adapter's status with its ``last_swap``."""
        status: dict[str, Any] = {}

        def done() -> bool:
            nonlocal status
            status = self.adapters().get(adapter, {})
            swap = status.get("last_swap") or {}
            if swap.get("version") == version and swap.get("result") not in (None, "served"):
                raise RuntimeError(f"{adapter}@{version}: swap {swap.get('result')}: {swap.get('error')}")
            served = status.get("served_version") == version and swap.get("version") == version
            return served and (not retired or status.get("installed_versions") == [version])

        self.wait_for(done, f"{adapter} to serve {version}", timeout)
        return status


def _signal_group(group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass


def _running(process: psutil.Process) -> bool:
    """Still there and not a zombie (an orphan's zombie may wait long for init to reap it)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


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
        body = {"model": self.model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "return_token_ids": True}  # fmt: skip
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
    return [
        b - a for s in streams for a, b in s.gaps() if not any(b >= start and a <= end for start, end in windows)
    ]


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
