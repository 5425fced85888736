"""A fleet of ``vllm serve`` replicas placed, restarted and found by Ray (extra ``[ray]``).

Each replica is a Ray actor that runs ``python -m vllm.entrypoints.openai.api_server``
with the plugin as a child process (through :mod:`.child`, so the child stops if the
actor's worker dies) on a free port of its node. When the child dies the actor exits,
and Ray restarts it (``max_restarts``), on the same node or, if that node is gone, on
another one: a new address, which :meth:`RayFleet.replicas` reports, because replicas
are found through their actor handles, not through a list of URLs.

Placement is Ray's: ``num_gpus`` (``gpus_per_replica``) or ``num_cpus`` per replica and
a scheduling strategy, ``"SPREAD"`` by default (one replica per node while nodes last),
as verl, SkyRL and OpenRLHF place their engines.

The fleet is what :class:`~vllm_lora_hotswap.fleet.scheduler.DistributedLoRAScheduler`
(``fleet=``) and :class:`trl_callbacks.FleetRollout` accept in place of a URL list; both
ask it for the live replicas each time they need them.

Example::

    fleet = RayFleet("Qwen/Qwen2.5-0.5B-Instruct", replicas=4, root="/cpfs/lora_ckpts",
                     gpus_per_replica=1, vllm_args=["--enable-lora"]).start()
    fleet.wait_healthy(600)
    print(fleet.urls())
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

HEALTH_TIMEOUT_S = 2.0


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the Ray fleet needs Ray: pip install 'vllm-lora-hotswap[ray]'") from exc
    return ray


@dataclass
class ReplicaInfo:
    """One replica as the fleet sees it now."""

    index: int
    url: str | None  # None while Ray restarts the replica (or cannot place it)
    node_id: str | None
    node_ip: str | None
    pid: int | None  # the API server's process id (on the replica's node)
    starts: int  # how many times this replica's actor has started (1: never restarted)
    healthy: bool
    error: str | None = None


class _ReplicaActor:
    """The body of a replica actor (wrapped with ``ray.remote`` in :meth:`RayFleet.start`)."""

    def __init__(self, index: int, model: str, host: str, args: list[str], env: dict[str, str], log_dir: str | None):
        import socket
        import subprocess
        import sys
        import threading

        import ray

        self.index = index
        self.stopping = False
        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.starts = _count_start(log_dir, index)
        with socket.socket() as sock:
            sock.bind((host if host != "0.0.0.0" else "", 0))
            self.port = sock.getsockname()[1]
        advertised = (
            "127.0.0.1" if host.startswith("127.") else (self.node_ip if host in ("0.0.0.0", "::", "") else host)
        )
        self.url = f"http://{advertised}:{self.port}"
        instance_id = f"ray-{index}@{self.node_ip}:{self.port}"
        command = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model,
            "--host",
            host,
            "--port",
            str(self.port),
            *args,
        ]
        child_env = {**os.environ, **env, "VLLM_HOTSWAP_INSTANCE_ID": env.get("VLLM_HOTSWAP_INSTANCE_ID", instance_id)}
        log = open(os.path.join(log_dir, f"replica-{index}.log"), "ab") if log_dir else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vllm_lora_hotswap.fleet.child", str(os.getpid()), *command],
            env=child_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        threading.Thread(target=self._watch, daemon=True, name="replica-child-watch").start()

    def _watch(self) -> None:
        """The child died: stop what is left of its process group and die, so that Ray restarts us."""
        import signal

        self.process.wait()
        if self.stopping:
            return  # stop() asked for it: no restart
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # engine core and worker of a killed API server
        except (ProcessLookupError, PermissionError):
            pass
        os._exit(1)

    def info(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "url": self.url,
            "node_id": self.node_id,
            "node_ip": self.node_ip,
            "pid": self.process.pid,
            "starts": self.starts,
        }

    def stop(self) -> None:
        import signal

        self.stopping = True
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(30)
        except (ProcessLookupError, PermissionError):
            pass
        except Exception:
            os.killpg(self.process.pid, signal.SIGKILL)


def _count_start(log_dir: str | None, index: int) -> int:
    """How many times replica ``index`` started (a counter file in ``log_dir``, on a shared
    file system in a real cluster); 0 when there is no log directory."""
    if not log_dir:
        return 0
    path = os.path.join(log_dir, f"replica-{index}.starts")
    try:
        with open(path) as file:
            count = int(file.read().strip() or 0) + 1
    except (FileNotFoundError, ValueError):
        count = 1
    with open(path, "w") as file:
        file.write(str(count))
    return count


class RayFleet:
    """N ``vllm serve`` replicas with the plugin, following the store ``root``, on a Ray cluster.

    Args:
        model: the model every replica serves.
        replicas: how many replicas.
        root: the store (``VLLM_HOTSWAP_ROOT``; default: that variable), on a file system
            every node mounts.
        gpus_per_replica: GPUs per replica (0: a CPU replica, ``cpus_per_replica`` CPUs);
            more than 1 adds ``--tensor-parallel-size``.
        cpus_per_replica: Ray CPUs per replica.
        strategy: Ray scheduling strategy: ``"SPREAD"`` (default), ``"DEFAULT"``, or a
            strategy object (e.g. ``PlacementGroupSchedulingStrategy``).
        vllm_args: arguments for every ``vllm serve``.
        env: environment of every replica (``VLLM_HOTSWAP_*`` settings, ...).
        replica_env: more environment for replica i (1-based), called once per replica at
            :meth:`start`; it follows the replica when Ray restarts it elsewhere. For CPU
            replicas that share a machine (a simulated cluster, or several replicas per node),
            give each its own cores: vLLM binds every CPU worker to the same core by default,
            and a worker busy-looping there starves the others::

                replica_env=lambda i: {"VLLM_CPU_OMP_THREADS_BIND": str(i - 1)}
        adapters: ``VLLM_HOTSWAP_ADAPTERS`` of replica i; ``{i}`` is replaced by i.
        host: address the replicas listen on (``0.0.0.0``: the URL names the node's IP).
        max_restarts: Ray's ``max_restarts`` for each replica actor (-1: without limit).
        address: the Ray cluster to join if Ray is not initialised yet (``ray.init(address)``).
        log_dir: one log file per replica (on each replica's node).
    """

    def __init__(
        self,
        model: str,
        *,
        replicas: int,
        root: str | None = None,
        gpus_per_replica: int = 0,
        cpus_per_replica: float = 1,
        strategy: Any = "SPREAD",
        vllm_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        replica_env: Callable[[int], Mapping[str, str]] | None = None,
        adapters: str = "*",
        host: str = "0.0.0.0",
        max_restarts: int = -1,
        address: str | None = None,
        log_dir: str | None = None,
    ):
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {replicas}")
        root = root or os.environ.get("VLLM_HOTSWAP_ROOT")
        if not root:
            raise ValueError("no store root: pass root= or set VLLM_HOTSWAP_ROOT")
        self.model = model
        self.count = replicas
        self.root = str(root)
        self.gpus_per_replica = gpus_per_replica
        self.cpus_per_replica = cpus_per_replica
        self.strategy = strategy
        self.vllm_args = list(vllm_args)
        if gpus_per_replica > 1 and "--tensor-parallel-size" not in self.vllm_args and "-tp" not in self.vllm_args:
            self.vllm_args += ["--tensor-parallel-size", str(gpus_per_replica)]
        self.env = dict(env or {})
        self.replica_env = replica_env
        self.adapters = adapters
        self.host = host
        self.max_restarts = max_restarts
        self.address = address
        self.log_dir = log_dir
        self.actors: list[Any] = []
        self._http = httpx.Client(timeout=HEALTH_TIMEOUT_S)
        self._health_checks = ThreadPoolExecutor(min(32, replicas), thread_name_prefix="ray-fleet-health")

    def start(self) -> RayFleet:
        ray = _ray()
        if not ray.is_initialized():
            ray.init(address=self.address)
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
        actor_class = ray.remote(_ReplicaActor)
        for index in range(1, self.count + 1):
            env = {
                **self.env,
                **(self.replica_env(index) if self.replica_env else {}),
                "VLLM_HOTSWAP_ROOT": self.root,
                "VLLM_HOTSWAP_ADAPTERS": self.adapters.replace("{i}", str(index)),
            }
            options: dict[str, Any] = {
                "num_cpus": self.cpus_per_replica,
                "num_gpus": self.gpus_per_replica,
                "max_restarts": self.max_restarts,
                "max_task_retries": 0,
                "scheduling_strategy": self.strategy,
            }
            self.actors.append(
                actor_class.options(**options).remote(index, self.model, self.host, self.vllm_args, env, self.log_dir)
            )
        return self

    # -- what the scheduler and FleetRollout ask ------------------------------------------
    def replicas(self, timeout: float = 5.0) -> list[ReplicaInfo]:
        """Every replica now: its address (None while Ray restarts it) and health."""
        ray = _ray()
        refs = [actor.info.remote() for actor in self.actors]
        # One timeout for all: a replica that Ray is restarting does not answer until it is back.
        answered = set(ray.wait(refs, num_returns=len(refs), timeout=timeout)[0]) if refs else set()
        raws: list[dict[str, Any] | str] = []
        for ref in refs:
            if ref not in answered:
                raws.append("GetTimeoutError")  # restarting, or not placeable now
                continue
            try:
                raws.append(ray.get(ref))
            except Exception as exc:  # dead for good, or died answering
                raws.append(type(exc).__name__)
        # Every replica's /health at once: one slow or unreachable node costs one timeout.
        healthy = self._health_checks.map(lambda raw: isinstance(raw, dict) and self._healthy(raw["url"]), raws)
        return [
            ReplicaInfo(healthy=ok, **raw)
            if isinstance(raw, dict)
            else ReplicaInfo(index, None, None, None, None, 0, False, raw)
            for index, (raw, ok) in enumerate(zip(raws, healthy), start=1)
        ]

    def urls(self) -> list[str]:
        """The URLs of the replicas that answer ``/health`` now."""
        return [r.url for r in self.replicas() if r.healthy and r.url]

    def wait_healthy(self, timeout: float, count: int | None = None) -> bool:
        """Wait until ``count`` (default: all) replicas are healthy."""
        count = self.count if count is None else count
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(r.healthy for r in self.replicas()) >= count:
                return True
            time.sleep(0.5)
        return False

    def _healthy(self, url: str) -> bool:
        try:
            return self._http.get(f"{url}/health").status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        """Stop every replica (its ``vllm serve`` first) and its actor."""
        ray = _ray()
        stops = [actor.stop.remote() for actor in self.actors]
        for ref in stops:
            try:
                ray.get(ref, timeout=40)
            except Exception:
                pass
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        self._health_checks.shutdown(wait=False)
        self._http.close()


def loopback_cluster(nodes: int = 2, cpus_per_node: float = 1) -> Any:
    """A simulated multi-node Ray cluster on this machine, every process on 127.0.0.1 (tests,
    benchmarks): a head without CPUs (nothing is placed there) and ``nodes`` nodes of
    ``cpus_per_node`` CPUs; the driver is connected. Returns the ``ray.cluster_utils.Cluster``.

    Ray replaces a loopback address with the machine's own one (``resolve_ip_for_localhost``)
    unless its single-machine switch is on: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, set here for
    the processes Ray starts (they read it when they import Ray) and patched in this one."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray = _ray()
    import ray._private.ray_constants as constants
    from ray.cluster_utils import Cluster

    constants.ENABLE_RAY_CLUSTER = False
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    for _ in range(nodes):
        cluster.add_node(num_cpus=cpus_per_node, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1")
    return cluster
