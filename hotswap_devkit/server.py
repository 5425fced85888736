"""A real vLLM OpenAI server with the plugin, run as a subprocess (its own process group):
the one harness of the engine tests and the benchmarks (``benchmarks.common.Server`` is this
class with the benchmarks' arguments)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil

# The tests' serving arguments (a toy model); the benchmarks pass their own.
TEST_ARGS = (
    "--enable-lora",
    "--max-lora-rank",
    "16",
    "--max-loras",
    "2",
    "--max-cpu-loras",
    "8",
    "--dtype",
    "float32",
    "--max-model-len",
    "256",
    "--enforce-eager",
    "--max-num-seqs",
    "16",
)


def own_core_env(index: int) -> dict[str, str]:
    """The environment that puts engine ``index``'s (1-based) vLLM CPU worker on a core of its
    own, as on a device of its own. vLLM binds every CPU worker to the same core by default, and
    a worker busy-looping there after each step starves another's steps, or its start-up."""
    cores = sorted(os.sched_getaffinity(0))
    return {"VLLM_CPU_OMP_THREADS_BIND": str(cores[(index - 1) % len(cores)])}


# The tests' plugin settings, under what a server is given (the benchmarks set their own).
TEST_ENV = {"VLLM_HOTSWAP_POLL_INTERVAL": "0.5", "VLLM_HOTSWAP_RETIRE_GRACE": "1"}


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    """``predicate()``'s first true value, polled every 50 ms; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.05)
    raise TimeoutError(f"{what} within {timeout}s")


def sse_lines(response: httpx.Response) -> Iterator[str]:
    """The lines of a server-sent event stream. Not ``iter_lines``: that splits like
    ``str.splitlines``, also at U+2028 or \\x85, which vLLM's JSON may carry unescaped
    in generated text."""
    pending = ""
    for text in response.iter_text():
        *lines, pending = (pending + text).split("\n")
        yield from lines
    if pending:
        yield pending


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_range(count: int) -> int:
    """A first port P such that P … P+count-1 are all free now (a launcher uses consecutive ports)."""
    while True:
        first = free_port()
        with contextlib.ExitStack() as held:
            try:
                for port in range(first, first + count):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return first


class VllmServer:
    """``python -m vllm.entrypoints.openai.api_server`` with ``VLLM_HOTSWAP_*`` settings.

    ``root``: the store (``VLLM_HOTSWAP_ROOT``), or None to leave it to ``env``.
    ``base_args`` and ``defaults`` (environment under ``env``) are the tests' unless given."""

    def __init__(
        self,
        model: Path,
        root: Path | None,
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        args: Sequence[str] = (),
        port: int | None = None,
        api_key: str | None = None,
        base_args: Sequence[str] = TEST_ARGS,
        defaults: dict[str, str] | None = None,
        start_timeout: float = 300,
    ):
        self.model = model
        self.root = root
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": "1",
            **(TEST_ENV if defaults is None else defaults),
            **({"VLLM_HOTSWAP_ROOT": str(root)} if root is not None else {}),
            **(env or {}),
        }
        self.args = [*base_args, *args, *(["--api-key", api_key] if api_key else [])]
        self.api_key = api_key
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.url, timeout=120, headers=headers)
        self.http = self.client  # the benchmarks' name for it

    def start(self, timeout: float | None = None) -> VllmServer:
        timeout = self.start_timeout if timeout is None else timeout
        command = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--port",
            str(self.port),
            "--host",
            "127.0.0.1",
            *self.args,
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # the child holds its own copy
            self.process = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"vLLM server exited with {self.process.returncode} (log: {self.log_path}):\n{self.log_tail()}"
                )
            try:
                if self.client.get("/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(
            f"vLLM server did not become healthy in {timeout:.0f}s (log: {self.log_path}):\n{self.log_tail()}"
        )

    def processes(self) -> list[psutil.Process]:
        """The API server and every process it started (engine core, worker, helpers); none if
        it is not running."""
        if self.process is None:
            return []
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        """Signal the API server and every process it started (its process group), and wait
        until they are gone, so that their memory and files are released."""
        if self.process is None or self.process.poll() is not None:
            return  # never started, or stopped (or exited) already: its group id may be another's now
        members = self.processes()
        _signal_group(self.process.pid, sig)
        deadline = time.monotonic() + timeout
        while any(_running(member) for member in members) and time.monotonic() < deadline + 10:
            self.process.poll()  # reap the API server
            if time.monotonic() > deadline:
                _signal_group(self.process.pid, signal.SIGKILL)
            time.sleep(0.2)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            _signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def kill(self) -> None:
        """SIGKILL the whole process group (API server, engine core, worker)."""
        self.stop(signal.SIGKILL)

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    # -- requests ----------------------------------------------------------------------
    def complete(self, model: str, prompt: str, max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
            **extra,
        }
        response = self.client.post("/v1/completions", json=body)
        response.raise_for_status()
        return response.json()

    def tokens(self, model: str, prompt: str, max_tokens: int = 8, **extra: Any) -> tuple[str, list[int]]:
        """(model that served the request, generated token ids)."""
        data = self.complete(model, prompt, max_tokens, **extra)
        return data["model"], data["choices"][0]["token_ids"]

    def stream(self, model: str, prompt: str, max_tokens: int) -> tuple[set[str], list[int]]:
        """A streamed greedy completion: (every model name its chunks gave, generated token ids)."""
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
            "stream": True,
        }
        served_by: set[str] = set()
        tokens: list[int] = []
        # A connection of its own, closed after: many client threads would otherwise leave
        # that many keep-alive connections open on the server (a soak counts its fds).
        with httpx.stream(
            "POST", f"{self.url}/v1/completions", json=body, timeout=120, headers=self.client.headers
        ) as response:
            response.raise_for_status()
            for line in sse_lines(response):
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                served_by.add(chunk["model"])
                for choice in chunk["choices"]:
                    tokens.extend(choice.get("token_ids") or [])
        return served_by, tokens

    def adapters_record(self) -> dict[str, Any]:
        """The instance's whole status record (``/v1/lora/adapters``)."""
        return self.client.get("/v1/lora/adapters").json()

    def adapters(self) -> dict[str, Any]:
        return self.client.get("/v1/lora/adapters").json()["adapters"]

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.log_tail(30)}")

    def wait_served(self, adapter: str, version: str, timeout: float = 60) -> None:
        self.wait_until(
            lambda: self.adapters().get(adapter, {}).get("served_version") == version,
            timeout,
            f"{adapter} to serve {version}",
        )

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = 120, interval: float = 0.05) -> None:
        # Not faster: on a small machine a tight status poll slows the swap it waits for.
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; log: {self.log_path}")
            time.sleep(interval)

    def wait_swapped(
        self, adapter: str, version: str, *, retired: bool = True, timeout: float = 120
    ) -> dict[str, Any]:
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


def start_all(servers: Iterable[VllmServer]) -> None:
    """Start servers side by side (start-up is mostly one core's work each), each stopped by its
    caller; the first failure is raised once every start has ended."""
    servers = list(servers)
    with ThreadPoolExecutor(max_workers=max(1, len(servers))) as starter:
        for started in [starter.submit(server.start) for server in servers]:
            started.result()
