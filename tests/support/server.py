"""A real vLLM OpenAI server (CPU) with the plugin, run as a subprocess for tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

BASE_ARGS = (
    "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2", "--max-cpu-loras", "8",
    "--dtype", "float32", "--max-model-len", "256", "--enforce-eager", "--max-num-seqs", "16",
)  # fmt: skip


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
    """``python -m vllm.entrypoints.openai.api_server`` with ``VLLM_HOTSWAP_*`` settings."""

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
    ):
        self.model = model
        self.root = root
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_HOTSWAP_POLL_INTERVAL": "0.5",
            "VLLM_HOTSWAP_RETIRE_GRACE": "1",
            **({"VLLM_HOTSWAP_ROOT": str(root)} if root is not None else {}),
            **(env or {}),
        }
        self.args = [*BASE_ARGS, *args, *(["--api-key", api_key] if api_key else [])]
        self.api_key = api_key
        self.process: subprocess.Popen[bytes] | None = None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.url, timeout=120, headers=headers)

    def start(self, timeout: float = 300) -> VllmServer:
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model), "--port", str(self.port), "--host", "127.0.0.1", *self.args,
        ]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if self.client.get("/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vLLM server did not become healthy in {timeout}s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def kill(self) -> None:
        """SIGKILL the whole process group (API server, engine core, worker)."""
        self.stop(signal.SIGKILL)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    # -- requests ----------------------------------------------------------------------
    def complete(self, model: str, prompt: str, max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "return_token_ids": True, **extra}  # fmt: skip
        response = self.client.post("/v1/completions", json=body)
        response.raise_for_status()
        return response.json()

    def tokens(self, model: str, prompt: str, max_tokens: int = 8, **extra: Any) -> tuple[str, list[int]]:
        """(model that served the request, generated token ids)."""
        data = self.complete(model, prompt, max_tokens, **extra)
        return data["model"], data["choices"][0]["token_ids"]

    def stream(self, model: str, prompt: str, max_tokens: int) -> tuple[set[str], list[int]]:
        """A streamed greedy completion: (every model name its chunks gave, generated token ids)."""
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "return_token_ids": True, "stream": True}  # fmt: skip
        served_by: set[str] = set()
        tokens: list[int] = []
        # A connection of its own, closed after: many client threads would otherwise leave
        # that many keep-alive connections open on the server (a soak counts its fds).
        with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=120, headers=self.client.headers) as response:
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
