"""The Ray fleet on a simulated two-node Ray cluster, on the loopback address only.

One module-scoped cluster (a head without CPUs and two nodes of one CPU each, so that
each replica has a node of its own) and one fleet of two real CPU engines, shared by the
tests in order: publish → both nodes serve it; a replica's process killed, then its node
removed → Ray restarts it and it serves the current version while the other replica
answers every request; FleetRollout across the fleet with a replica killed mid-batch;
blue-green across the nodes; ``lora-hotswap launch --ray`` on a node added for it.
"Serves version X" is checked against HF + PEFT greedy.

Loopback: see :func:`vllm_lora_hotswap.fleet.ray_fleet.loopback_cluster` (the variable is
also set here before Ray is imported).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray", reason="the Ray fleet needs the [ray] extra")

from hotswap_devkit.server import TEST_ARGS as BASE_ARGS  # noqa: E402
from hotswap_devkit.server import own_core_env, wait_for  # noqa: E402
from trl_callbacks import FleetRollout, HotSwapCallback  # noqa: E402
from vllm_lora_hotswap.fleet.ray_fleet import RayFleet, ReplicaInfo, loopback_cluster  # noqa: E402
from vllm_lora_hotswap.fleet.scheduler import DistributedLoRAScheduler  # noqa: E402
from vllm_lora_hotswap.store import CheckpointStore  # noqa: E402

pytestmark = [pytest.mark.engine, pytest.mark.ray]
PROMPT = "the quick brown fox"
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOTSWAP_POLL_INTERVAL": "0.5", "VLLM_HOTSWAP_RETIRE_GRACE": "1"}


@pytest.fixture(scope="module")
def ray_store(tmp_path_factory: pytest.TempPathFactory) -> CheckpointStore:
    return CheckpointStore(tmp_path_factory.mktemp("ray-store"))


@pytest.fixture(scope="module")
def cluster_and_fleet(
    toy_model: Path, ray_store: CheckpointStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Any, RayFleet]]:
    cluster = loopback_cluster()
    fleet = RayFleet(
        str(toy_model),
        replicas=2,
        root=str(ray_store.root),
        host="127.0.0.1",
        vllm_args=BASE_ARGS,
        env=ENV,
        replica_env=own_core_env,  # the simulated nodes share this machine's cores
        log_dir=str(tmp_path_factory.mktemp("ray-logs")),
    ).start()
    try:
        assert fleet.wait_healthy(300), f"replicas: {fleet.replicas()}"
        yield cluster, fleet
    finally:
        fleet.stop()
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def fleet(cluster_and_fleet: tuple[Any, RayFleet]) -> RayFleet:
    return cluster_and_fleet[1]


def greedy(url: str, model: str) -> list[int]:
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": 8,
        "temperature": 0.0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    response.raise_for_status()
    return response.json()["choices"][0]["token_ids"]


def served(url: str, adapter: str) -> str | None:
    try:
        return (
            httpx.get(f"{url}/v1/lora/adapters", timeout=5).json()["adapters"].get(adapter, {}).get("served_version")
        )
    except httpx.HTTPError:
        return None


def replica(fleet: RayFleet, index: int) -> ReplicaInfo:
    return fleet.replicas()[index - 1]


def test_replicas_on_two_nodes_serve_a_publication(
    fleet: RayFleet, ray_store: CheckpointStore, make_lora: Callable[..., Path], reference: Callable[..., list[int]]
) -> None:
    replicas = fleet.replicas()
    assert [r.healthy for r in replicas] == [True, True]
    assert len({r.node_id for r in replicas}) == 2, "SPREAD puts one replica on each node"
    assert all(r.url.startswith("http://127.0.0.1:") for r in replicas)

    async def publish() -> tuple[str, bool, dict[str, Any]]:
        scheduler = DistributedLoRAScheduler(cpfs_base=str(ray_store.root), fleet=fleet, enable_probe=False)
        try:
            version = await scheduler.publish_lora_update("policy", make_lora(1))
            converged = await scheduler.wait_converged("policy", version, timeout=60)
            return version, converged, await scheduler.get_system_status()
        finally:
            await scheduler.stop()

    version, converged, status = asyncio.run(publish())
    assert converged
    assert status["healthy"] == 2
    assert all(i["served_versions"].get("policy") == version for i in status["instances"])
    for r in replicas:
        assert greedy(r.url, "policy") == reference(make_lora(1), PROMPT)


def test_killed_replica_and_removed_node_are_restarted_by_ray(
    cluster_and_fleet: tuple[Any, RayFleet],
    ray_store: CheckpointStore,
    make_lora: Callable[..., Path],
    reference: Callable[..., list[int]],
) -> None:
    cluster, fleet = cluster_and_fleet
    version = ray_store.publish("policy", make_lora(2))
    wait_for(lambda: all(served(u, "policy") == version for u in fleet.urls()), 60, "both replicas to serve v2")
    expected = reference(make_lora(2), PROMPT)
    victim, survivor = fleet.replicas()

    # Traffic on the survivor throughout: not one request may fail.
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                assert greedy(survivor.url, "policy") == expected
                answered[0] += 1
            except Exception as exc:  # noqa: BLE001 - every failure counts
                failures.append(repr(exc))
            stop.wait(0.25)  # steady traffic that leaves the restarting replica CPU to start on

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        # 1. The replica's process dies: its actor exits, Ray restarts it (a new process).
        os.killpg(victim.pid, signal.SIGKILL)
        wait_for(lambda: not replica(fleet, 1).healthy, 60, "the fleet to report replica 1 down")
        back = wait_for(lambda: (r := replica(fleet, 1)).healthy and r.pid != victim.pid and r, 300, "replica 1 back")
        assert back.starts == victim.starts + 1
        wait_for(lambda: served(back.url, "policy") == version, 60, "the restarted replica to serve v2")
        assert greedy(back.url, "policy") == expected

        # 2. Its node goes away: Ray places it on the node that replaces it, at a new address.
        old_node = next(n for n in cluster.worker_nodes if n.node_id == back.node_id)
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.remove_node(old_node)
        wait_for(lambda: not replica(fleet, 1).healthy, 60, "the fleet to report replica 1 down")
        moved = wait_for(lambda: (r := replica(fleet, 1)).healthy and r, 300, "replica 1 back on another node")
        assert moved.node_id not in (back.node_id, survivor.node_id)
        assert moved.url != back.url
        wait_for(lambda: served(moved.url, "policy") == version, 60, "the moved replica to serve v2")
        assert greedy(moved.url, "policy") == expected
    finally:
        stop.set()
        thread.join(120)
    assert failures == []
    assert answered[0] > 0
    assert replica(fleet, 2).pid == survivor.pid, "the surviving replica was never restarted"


def test_fleet_rollout_resends_the_share_of_a_replica_killed_mid_batch(
    fleet: RayFleet, ray_store: CheckpointStore, toy_model: Path, make_lora: Callable[..., Path]
) -> None:
    from transformers import TrainerState

    from hotswap_devkit.toy_models import ReferenceModel

    publisher = HotSwapCallback(ray_store.root, "policy", on_improvement=False, every_n_steps=1)
    rollout = FleetRollout(fleet, publisher, sampling_params={"max_tokens": 4, "ignore_eos": True}, timeout=300)
    assert sorted(rollout.urls) == sorted(fleet.urls())
    policy = ReferenceModel(toy_model, make_lora(3))
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(num_processes=1),
        state=TrainerState(),
        model=policy.model,
        processing_class=policy.tokenizer,
        num_generations=2,
        max_completion_length=4,
        temperature=1.0,
        top_p=1.0,
        top_k=None,
        min_p=None,
        repetition_penalty=1.0,
    )
    prompts = ["the quick brown fox", "the quick brown fox", "hello world hello", "hello world hello"]

    victim = fleet.replicas()[0]
    generate = rollout._generate

    def generate_after_a_kill(*args: Any) -> Any:
        os.killpg(victim.pid, signal.SIGKILL)  # after the wait chose the version, before the batch is sent
        wait_for(lambda: not _up(victim.url), 30, "the killed replica to stop answering")
        return generate(*args)

    rollout._generate = generate_after_a_kill  # type: ignore[method-assign]
    batch = rollout(prompts, trainer)
    rollout._generate = generate  # type: ignore[method-assign]
    assert len(batch["completion_ids"]) == len(prompts)
    assert len(set(batch["policy_version"])) == 1
    assert rollout.resent and rollout.resent[0][0] == victim.url

    # The replica is back (Ray restarted it): the next batch is picked up by both.
    wait_for(lambda: len(fleet.urls()) == 2, 300, "the killed replica back")
    batch = rollout(prompts, trainer)
    assert len(set(batch["policy_version"])) == 1
    assert len(rollout.urls) == 2 and victim.url not in rollout.urls
    publisher.notifier.close()


def test_blue_green_across_nodes(
    fleet: RayFleet, ray_store: CheckpointStore, make_lora: Callable[..., Path], reference: Callable[..., list[int]]
) -> None:
    async def update() -> tuple[str, list[str]]:
        scheduler = DistributedLoRAScheduler(cpfs_base=str(ray_store.root), fleet=fleet, enable_probe=False)
        verified: list[str] = []

        def verify(green: str) -> bool:
            urls = fleet.urls()
            verified.extend(url for url in urls if greedy(url, green) == reference(make_lora(4), PROMPT))
            return len(verified) == len(urls)

        try:
            return await scheduler.blue_green_update("bg", make_lora(4), verify=verify, timeout=120), verified
        finally:
            await scheduler.stop()

    version, verified = asyncio.run(update())
    replicas = fleet.replicas()
    assert len(verified) == 2 and len({r.node_id for r in replicas}) == 2
    for r in replicas:
        assert served(r.url, "bg") == version
        assert greedy(r.url, "bg") == reference(make_lora(4), PROMPT)
    assert ray_store.is_retired("bg-green")
    wait_for(
        lambda: all(served(r.url, "bg-green") is None for r in replicas), 60, "the green name retired on both nodes"
    )


def test_launch_on_ray_serves_the_store_and_stops_on_ctrl_c(
    cluster_and_fleet: tuple[Any, RayFleet],
    ray_store: CheckpointStore,
    toy_model: Path,
    reference: Callable[..., list[int]],
    tmp_path: Path,
) -> None:
    """``lora-hotswap launch --ray ADDRESS``: its replica joins the cluster (on a node added for
    it), serves the store's current version, and Ctrl-C stops it and exits 0."""
    cluster, _ = cluster_and_fleet
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    command = [
        *(sys.executable, "-m", "vllm_lora_hotswap.cli", "launch", "--ray", cluster.address),
        *("--model", str(toy_model), "--instances", "1", "--host", "127.0.0.1", "--startup-timeout", "300"),
        *("--root", str(ray_store.root), "--log-dir", str(tmp_path / "logs"), "--", *BASE_ARGS),
    ]
    env = {**os.environ, **ENV, "COLUMNS": "200"}  # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set above
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    up = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            if "fleet up on Ray" in line:
                up.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert up.wait(360), "launch --ray did not come up:\n" + "".join(output[-40:])
        (url,) = {word for line in output for word in line.split() if word.startswith("http://127.0.0.1:")}
        version = ray_store.active_version("policy")
        wait_for(lambda: served(url, "policy") == version, 60, "the launched replica to serve the current version")
        assert greedy(url, "policy") == reference(ray_store.version_dir("policy", version), PROMPT)
        process.send_signal(signal.SIGINT)
        assert process.wait(120) == 0, "".join(output[-40:])
    finally:
        if process.poll() is None:
            process.kill()
    reader.join(10)
    assert "stopped" in "".join(output)
    assert not _up(url)


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
