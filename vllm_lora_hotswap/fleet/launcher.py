"""``lora-hotswap launch``: N vLLM servers with the plugin, supervised as one fleet.

Each instance is ``python -m vllm.entrypoints.openai.api_server`` in a process
group of its own (API server, engine core and workers), with its GPUs, port,
``VLLM_HOTSWAP_INSTANCE_ID`` and ``VLLM_HOTSWAP_ADAPTERS``. The launcher waits
for health, restarts an instance that dies, forwards Ctrl-C/SIGTERM and stops
every process group; children are also told to exit if the launcher itself is
killed (``PR_SET_PDEATHSIG``, set by :mod:`.child`), so nothing is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class Instance:
    index: int  # 1-based, as in the scheduler API (instance i serves lora{i})
    port: int
    instance_id: str
    adapters: str
    gpus: list[int]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    state: str = "pending"  # pending | starting | healthy | restarting | exited | stopped
    restarts: int = 0
    started_at: float = 0.0
    exit_codes: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Launcher:
    def __init__(
        self,
        model: str,
        *,
        instances: int,
        base_port: int = 8001,
        gpus_per_instance: int = 0,
        adapters: str = "*",
        host: str = "0.0.0.0",
        root: str | None = None,
        log_dir: Path = Path("lora-hotswap-logs"),
        extra_args: Sequence[str] = (),
        restart: bool = True,
        env: Mapping[str, str] | None = None,
    ):
        if instances < 1:
            raise ValueError(f"--instances must be at least 1, got {instances}")
        if gpus_per_instance < 0:
            raise ValueError(f"--gpus-per-instance must be 0 (CPU) or more, got {gpus_per_instance}")
        root = root or os.environ.get("VLLM_HOTSWAP_ROOT")
        if not root:
            raise ValueError("no store root: pass --root or set VLLM_HOTSWAP_ROOT")
        self.model = model
        self.host = host
        self.root = root
        self.extra_args = list(extra_args)
        self.restart = restart
        self.extra_env = dict(env or {})
        self.gpus_per_instance = gpus_per_instance
        log_dir.mkdir(parents=True, exist_ok=True)
        self.instances = [
            Instance(
                index=i,
                port=base_port + i - 1,
                instance_id=f"{os.uname().nodename}:{base_port + i - 1}",
                adapters=adapters.replace("{i}", str(i)),
                gpus=list(range((i - 1) * gpus_per_instance, i * gpus_per_instance)),
                log_path=log_dir / f"instance-{i}.log",
            )
            for i in range(1, instances + 1)
        ]
        self._stopping = threading.Event()

    # -- processes ---------------------------------------------------------------------
    def _command(self, instance: Instance) -> list[str]:
        args = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model,
            "--host",
            self.host,
            "--port",
            str(instance.port),
            *self.extra_args,
        ]
        if (
            self.gpus_per_instance > 1
            and "--tensor-parallel-size" not in self.extra_args
            and "-tp" not in self.extra_args
        ):
            args += ["--tensor-parallel-size", str(self.gpus_per_instance)]
        return args

    def _env(self, instance: Instance) -> dict[str, str]:
        env = {
            **os.environ,
            **self.extra_env,
            "VLLM_HOTSWAP_ROOT": self.root,
            "VLLM_HOTSWAP_INSTANCE_ID": instance.instance_id,
            "VLLM_HOTSWAP_ADAPTERS": instance.adapters,
        }
        if self.gpus_per_instance:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, instance.gpus))
        return env

    def _spawn(self, instance: Instance) -> None:
        log = open(instance.log_path, "ab")  # noqa: SIM115 - owned by the child
        instance.process = subprocess.Popen(
            [sys.executable, "-m", "vllm_lora_hotswap.fleet.child", str(os.getpid()), *self._command(instance)],
            env=self._env(instance),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        instance.state = "starting"
        instance.started_at = time.monotonic()

    def start(self) -> None:
        for instance in self.instances:
            self._spawn(instance)

    def poll(self) -> None:
        """Update each instance's state; restart one that died (unless stopping)."""
        for instance in self.instances:
            process = instance.process
            if process is None or instance.state in ("stopped",):
                continue
            code = process.poll()
            if code is not None:
                instance.exit_codes.append(code)
                # An API server killed alone leaves its engine core and worker behind in
                # its process group, holding memory (and the GPU): stop them first.
                _signal_group(process, signal.SIGKILL)
                if self.restart and not self._stopping.is_set():
                    instance.restarts += 1
                    instance.state = "restarting"
                    self._spawn(instance)
                else:
                    instance.state = "exited"
                continue
            if instance.state in ("starting", "restarting") and _healthy(instance.url):
                instance.state = "healthy"

    def wait_healthy(self, timeout: float, on_progress: Callable[[list[Instance]], None] | None = None) -> bool:
        deadline = time.monotonic() + timeout
        while not self._stopping.is_set() and time.monotonic() < deadline:
            self.poll()
            if on_progress is not None:
                on_progress(self.instances)
            if all(i.state == "healthy" for i in self.instances):
                return True
            if any(i.state == "exited" for i in self.instances):
                return False  # died and not restarted: waiting longer cannot help
            time.sleep(0.5)
        return False

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every instance's process group, then SIGKILL what is left."""
        self._stopping.set()
        running = [i for i in self.instances if i.process is not None and i.process.poll() is None]
        for instance in running:
            _signal_group(instance.process, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for instance in running:
            assert instance.process is not None
            try:
                instance.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for instance in self.instances:
            if instance.process is not None:
                _signal_group(instance.process, signal.SIGKILL)  # leftovers of the group (engine core, workers)
                instance.process.wait()
            instance.state = "stopped"

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def install_signal_handlers(self) -> None:
        def handle(signum: int, _frame: object) -> None:
            self._stopping.set()

        signal.signal(signal.SIGINT, handle)
        signal.signal(signal.SIGTERM, handle)

    def supervise(self, interval: float = 1.0) -> None:
        """Until a signal arrives: keep instances up (restarting the dead)."""
        while not self._stopping.wait(interval):
            self.poll()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def _signal_group(process: subprocess.Popen[bytes] | None, sig: int) -> None:
    if process is None:
        return
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
