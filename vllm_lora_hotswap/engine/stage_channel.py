"""Staging messages between the API server and the workers, outside the engine loop.

A worker RPC runs between two engine steps: starting a stage, or asking
whether it is done, that way first waits for the running step to end (66 ms
on the benchmark model) and then holds the engine. Instead the API server
sends "stage these" straight to each worker's Unix datagram socket, and each
worker's staging thread reports back the moment it is done: a stage starts
at once, and its completion reaches the controller as a signal.

The server makes a private directory and binds ``server.sock`` in it; one
``hotswap_channel`` RPC at start-up has every worker bind its own socket
there and answer its path, in the order worker RPCs answer. Without a
channel (a worker could not bind, an offline engine) staging falls back to
RPCs, and a stage whose reports stop coming is asked about by RPC too.

Installs of a new slot id go the same way: the worker flips the slot it
staged into while the engine runs (no request maps to a slot it has not been
told about) and answers. An install the worker cannot do by a flip alone (the
slot was lost and must be copied, an in-place replacement of a routed id), or
one whose answer does not come, goes by the install RPC between two steps.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("vllm.lora_hotswap")
Key = tuple[int, str]  # (lora_id, path)
MAX_MESSAGE = 1 << 16
# A stage with no report for this long is asked about by RPC (a worker that died
# or restarted, a message that never came); an install with no answer goes by RPC.
REPORT_PATIENCE_S = 2.0


def _bind(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path.unlink(missing_ok=True)
    sock.bind(str(path))
    return sock


def _serve(sock: socket.socket, handle: Callable[[dict[str, Any]], None], name: str) -> None:
    def loop() -> None:
        while True:
            try:
                data = sock.recv(MAX_MESSAGE)
            except OSError:
                return  # closed
            try:
                handle(json.loads(data))
            except Exception:  # a bad message must not end the channel
                logger.exception("hot-swap: stage channel message not handled")

    threading.Thread(target=loop, name=name, daemon=True).start()


class WorkerChannel:
    """A worker's end: stage and install requests in, their outcomes out."""

    def __init__(
        self,
        directory: str,
        label: str,
        on_stage: Callable[[int, str, str], None],
        on_install: Callable[[int, str], dict[str, Any]],
        on_read_ahead: Callable[[str, str, int], object] | None = None,
    ):
        self.server = str(Path(directory) / "server.sock")
        self.path = Path(directory) / f"worker-{label}-{os.getpid()}.sock"
        self._sock = _bind(self.path)
        self._on_stage = on_stage
        self._on_install = on_install
        self._on_read_ahead = on_read_ahead
        _serve(self._sock, self._handle, f"hotswap-channel-{label}")

    def _handle(self, message: dict[str, Any]) -> None:
        for path, sha256, size in message.get("read_ahead", ()) if self._on_read_ahead else ():
            self._on_read_ahead(path, sha256, size)
        for lora_id, name, path in message.get("stage", ()):
            self._on_stage(lora_id, name, path)
        for lora_id, path in message.get("install", ()):
            self.report(lora_id, path, self._on_install(lora_id, path), kind="install")

    def report(self, lora_id: int, path: str, status: dict[str, Any], *, kind: str = "stage") -> None:
        message = json.dumps(
            {"worker": str(self.path), "kind": kind, "lora_id": lora_id, "path": path, **status}
        ).encode()
        try:
            self._sock.sendto(message, self.server)
        except OSError:
            pass  # the server is gone or not listening: it asks by RPC after REPORT_PATIENCE_S


class ServerChannel:
    """The API server's end: sends stage requests to every worker, collects their reports."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="lora-hotswap-"))
        self._sock = _bind(self.directory / "server.sock")
        self.workers: list[str] = []  # socket paths, in worker-RPC order
        self._condition = threading.Condition()
        self._started: dict[Key, float] = {}  # guarded by _condition
        self._reports: dict[Key, dict[str, dict[str, Any]]] = {}  # key -> worker path -> status
        self._installs: dict[Key, dict[str, dict[str, Any]]] = {}  # installs awaiting answers, the same way
        _serve(self._sock, self._handle, "hotswap-channel-server")

    def connect(self, worker_paths: Sequence[str | None]) -> bool:
        if not worker_paths or any(path is None for path in worker_paths):
            return False
        self.workers = [str(path) for path in worker_paths]
        return True

    def close(self) -> None:
        self._sock.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def read_ahead(self, path: str, sha256: str, size: int) -> bool:
        """Ask every worker to read ``path`` ahead of its commit (:mod:`.read_ahead`); False if one
        could not be reached (it then reads at staging, as without)."""
        message = json.dumps({"read_ahead": [[path, sha256, size]]}).encode()
        sent = True
        for worker in self.workers:
            try:
                self._sock.sendto(message, worker)
            except OSError as exc:  # that worker reads at staging; the others still read ahead
                logger.debug("hot-swap: read ahead to worker %s not sent (%s)", worker, exc)
                sent = False
        return sent

    def stage(self, items: Sequence[list[Any]]) -> bool:
        """Send ``[lora_id, name, path]`` items to every worker; False if one could not be reached."""
        now = time.monotonic()
        with self._condition:
            for lora_id, _, path in items:
                self._started[lora_id, path] = now
                self._reports.pop((lora_id, path), None)
        message = json.dumps({"stage": [list(item) for item in items]}).encode()
        try:
            for worker in self.workers:
                self._sock.sendto(message, worker)
        except OSError as exc:
            logger.warning("hot-swap: stage channel to a worker failed (%s); staging by RPC", exc)
            with self._condition:
                for lora_id, _, path in items:
                    self._started.pop((lora_id, path), None)
            return False
        return True

    def statuses(self, key: Key) -> list[dict[str, Any]] | None:
        """One status per worker (``pending`` where none came yet), or None if the channel
        cannot tell: the key was not staged through it, or its reports stopped coming."""
        with self._condition:
            started = self._started.get(key)
            if started is None:
                return None
            reports = self._reports.get(key, {})
            if len(reports) < len(self.workers) and time.monotonic() - started > REPORT_PATIENCE_S:
                return None
            pending = {"state": "pending", "error": None, "nbytes": 0}
            return [reports.get(worker, pending) for worker in self.workers]

    def wait(self, key: Key, timeout: float) -> None:
        """Until every worker reported on ``key``, or ``timeout`` seconds."""
        with self._condition:
            self._condition.wait_for(lambda: len(self._reports.get(key, ())) >= len(self.workers), timeout)

    def install(self, keys: Sequence[Key], timeout: float | None = None) -> list[list[dict[str, Any]] | None]:
        """Ask every worker to install each ``(lora_id, path)`` by a flip, off the step. Per key,
        every worker's answer (in worker order), or None when one did not answer within
        ``timeout`` seconds (default :data:`REPORT_PATIENCE_S`) or could not be reached."""
        with self._condition:
            for key in keys:
                self._installs[key] = {}
        try:
            message = json.dumps({"install": [list(key) for key in keys]}).encode()
            for worker in self.workers:
                self._sock.sendto(message, worker)
        except OSError as exc:
            logger.warning("hot-swap: install over the stage channel failed (%s); installing by RPC", exc)
            timeout = 0.0

        def answered() -> bool:
            return all(len(self._installs[key]) >= len(self.workers) for key in keys)

        with self._condition:
            self._condition.wait_for(answered, REPORT_PATIENCE_S if timeout is None else timeout)
            answers = {key: self._installs.pop(key) for key in keys}
        return [
            [answers[key][w] for w in self.workers] if len(answers[key]) >= len(self.workers) else None for key in keys
        ]

    def forget(self, key: Key) -> None:
        with self._condition:
            self._started.pop(key, None)
            self._reports.pop(key, None)

    def _handle(self, message: dict[str, Any]) -> None:
        key = (message.pop("lora_id"), message.pop("path"))
        worker = message.pop("worker")
        kind = message.pop("kind", "stage")
        with self._condition:
            if kind == "install":
                if key in self._installs:  # else an answer that came too late: the RPC installed it
                    self._installs[key][worker] = message
                    self._condition.notify_all()
            elif key in self._started:
                self._reports.setdefault(key, {})[worker] = message
                self._condition.notify_all()
