"""Two real CPU instances under `lora-hotswap launch`, driven through the scheduler API."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from hotswap_devkit.server import TEST_ARGS, free_port, free_port_range
from tests.conftest import PROMPTS
from tests.support.fake import write_lora
from tests.support.inject import inject_version
from vllm_lora_hotswap.fleet.scheduler import LoRAHotSwapConfig, LoRAUpdateEvent, create_distributed_lora_scheduler
from vllm_lora_hotswap.status import fleet_status
from vllm_lora_hotswap.store import CheckpointStore

pytestmark = pytest.mark.engine


@dataclass
class Fleet:
    process: subprocess.Popen[str]
    root: Path
    base_port: int
    log_dir: Path

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.base_port + i}" for i in range(2)]

    def tokens(self, url: str, model: str, prompt: str) -> tuple[str, list[int]]:
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": 8,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        data = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        return data["model"], data["choices"][0]["token_ids"]


def launch(toy_model: Path, root: Path, log_dir: Path, base_port: int, instances: int) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_HOTSWAP_POLL_INTERVAL": "0.5",
        "VLLM_HOTSWAP_RETIRE_GRACE": "1",
    }
    # The weight-update routes let a test hold an engine paused: a probe then waits in it.
    command = [
        sys.executable,
        "-m",
        "vllm_lora_hotswap.cli",
        "launch",
        "--model",
        str(toy_model),
        "--instances",
        str(instances),
        "--base-port",
        str(base_port),
        "--gpus-per-instance",
        "0",
        "--host",
        "127.0.0.1",
        "--root",
        str(root),
        "--log-dir",
        str(log_dir),
        "--",
        *TEST_ARGS,
        "--weight-transfer-config",
        '{"backend": "gloo"}',
    ]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_line(process: subprocess.Popen[str], needle: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"launcher never printed {needle!r}:\n{''.join(seen)[-3000:]}")


def stop_and_check_no_orphans(process: subprocess.Popen[str], sig: int) -> None:
    descendants = psutil.Process(process.pid).children(recursive=True)
    assert descendants, "the launcher has no children to stop"
    process.send_signal(sig)
    process.wait(120)
    time.sleep(1)
    alive = [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"


@pytest.fixture(scope="module")
def fleet(toy_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root, log_dir = tmp_path_factory.mktemp("fleet-store"), tmp_path_factory.mktemp("fleet-logs")
    base_port = free_port_range(2)
    process = launch(toy_model, root, log_dir, base_port, instances=2)
    wait_for_line(process, "fleet up", 600)
    yield Fleet(process, root, base_port, log_dir)
    stop_and_check_no_orphans(process, signal.SIGTERM)  # the launcher leaves nothing behind


def run(coro):
    return asyncio.run(coro)


def test_publish_rollback_and_events_across_two_instances(fleet: Fleet, make_lora, reference) -> None:
    lora_v1, lora_v2 = make_lora(101), make_lora(102)

    async def scenario() -> tuple[list[LoRAUpdateEvent], str, str, dict, dict]:
        scheduler = create_distributed_lora_scheduler(
            base_port=fleet.base_port, num_gpus=2, cpfs_base=str(fleet.root), poll_interval=0.5, enable_probe=True
        )
        events: list[LoRAUpdateEvent] = []

        async def on_updated(event: LoRAUpdateEvent) -> None:  # async callbacks are accepted
            events.append(event)

        scheduler.on_lora_updated = on_updated
        scheduler.on_lora_failed = events.append  # and plain ones
        await scheduler.start()
        v1 = await scheduler.publish_lora_update(
            lora_id=1, src_ckpt_dir=str(lora_v1), metadata={"reward": 0.85, "training_step": 100}
        )
        assert await scheduler.wait_converged(1, v1, timeout=60)
        v2 = await scheduler.publish_lora_update(1, lora_v2, {"reward": 0.9})
        assert await scheduler.wait_converged(1, v2, timeout=60)
        status = await scheduler.get_lora_status(lora_id=1)
        assert await scheduler.rollback_lora(lora_id=1, target_timestamp=v1)
        assert not await scheduler.rollback_lora(1, "2020-01-01T00-00-00Z")
        assert await scheduler.wait_converged(1, v1, timeout=60)
        pinned = await scheduler.get_lora_status(1)
        deadline = time.monotonic() + 60
        while len(events) < 6 and time.monotonic() < deadline:  # 3 swaps x 2 instances, delivered with smoke tests
            await asyncio.sleep(0.2)
        await scheduler.stop()
        return events, v1, v2, status, pinned

    events, v1, v2, status, pinned = run(scenario())
    assert status["current_version"] == v2 and status["available_versions"] == [v1, v2] and status["converged"]
    assert {i["version"] for i in status["instances"].values()} == {v2} and len(status["instances"]) == 2
    assert pinned["current_version"] == v1 and pinned["pinned"] == v1 and pinned["converged"]
    for url in fleet.urls:
        for prompt in PROMPTS:
            assert fleet.tokens(url, "lora1", prompt) == (f"lora1@{v1}", reference(lora_v1, prompt))
    # on_lora_updated fires once per instance per swap: v1, v2, then v1 again (the rollback).
    assert not [e for e in events if e.error_message]
    counts = Counter((e.timestamp, e.instance_id) for e in events)
    instances = {i for _, i in counts}
    assert len(instances) == 2
    assert counts == {**{(v1, i): 2 for i in instances}, **{(v2, i): 1 for i in instances}}
    first = next(e for e in events if e.timestamp == v1)
    assert first.lora_id == 1 and first.metadata["reward"] == 0.85 and first.metadata["training_step"] == 100
    CheckpointStore(fleet.root).follow("lora1")


def test_bad_version_fires_on_lora_failed_per_instance(fleet: Fleet, tmp_path: Path, make_lora, reference) -> None:
    store = CheckpointStore(fleet.root)
    good = make_lora(103)

    async def scenario() -> tuple[list[LoRAUpdateEvent], str, str]:
        scheduler = create_distributed_lora_scheduler(
            base_port=fleet.base_port, num_gpus=2, cpfs_base=str(fleet.root), poll_interval=0.5
        )
        failures: list[LoRAUpdateEvent] = []
        scheduler.on_lora_failed = failures.append
        await scheduler.start()
        v1 = await scheduler.publish_lora_update("badfleet", good)
        assert await scheduler.wait_converged("badfleet", v1, timeout=60)
        bad = inject_version(store, "badfleet", write_lora(tmp_path / "nan", value=float("nan")))
        deadline = time.monotonic() + 60
        while len({e.instance_id for e in failures}) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await scheduler.stop()
        return failures, v1, bad

    failures, v1, bad = run(scenario())
    assert {e.timestamp for e in failures} == {bad} and len({e.instance_id for e in failures}) == 2
    assert all("NaN or inf" in e.error_message for e in failures)
    for url in fleet.urls:
        assert fleet.tokens(url, "badfleet", PROMPTS[0]) == (f"badfleet@{v1}", reference(good, PROMPTS[0]))


def test_system_status_custom_configs_and_blue_green(fleet: Fleet, make_lora, reference) -> None:
    blue, green = make_lora(104), make_lora(105)

    async def scenario() -> tuple[dict, str, str]:
        scheduler = create_distributed_lora_scheduler(
            base_port=fleet.base_port,
            num_gpus=2,
            cpfs_base=str(fleet.root),
            poll_interval=0.5,
            configs=[
                LoRAHotSwapConfig(
                    lora_id=7,
                    port=fleet.base_port,
                    cpfs_root=str(fleet.root),
                    adapter_name="custom_lora7",
                    adapter_id=7,
                )
            ],
        )
        first = await scheduler.publish_lora_update(7, blue)
        assert await scheduler.wait_converged(7, first, timeout=60)
        verified: list[str] = []
        version = await scheduler.blue_green_update(
            7, green, {"reward": 1.0}, verify=lambda name: verified.append(name) or True
        )
        assert verified == ["custom_lora7-green"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the green name is retired, asynchronously, everywhere
            system = await scheduler.get_system_status()
            if all(i["served_versions"].get("custom_lora7-green") is None for i in system["instances"]):
                break
            await asyncio.sleep(0.2)
        await scheduler.stop()
        return system, first, version

    system, first, version = run(scenario())
    assert system["healthy"] == 2
    for instance in system["instances"]:
        assert instance["served_versions"]["custom_lora7"] == version and instance["heartbeat_age"] < 10
        timings = instance["last_swap"]["custom_lora7"]["timings"]
        assert set(timings) >= {"validate", "stage", "install", "probe", "switch"}
        stage_phases = [timings[p] for p in ("stage_read", "stage_load", "stage_check", "stage_slot")]
        assert all(seconds >= 0 for seconds in stage_phases) and sum(stage_phases) <= timings["stage"]
        assert instance["served_versions"].get("custom_lora7-green") is None
    for url in fleet.urls:
        assert fleet.tokens(url, "custom_lora7", PROMPTS[0]) == (
            f"custom_lora7@{version}",
            reference(green, PROMPTS[0]),
        )
    assert CheckpointStore(fleet.root).is_retired("custom_lora7-green")


def _vllm_process(server: psutil.Process, title: str) -> psutil.Process:
    """The descendant of ``server`` whose process title (vLLM sets them) contains ``title``."""
    for process in server.children(recursive=True):
        if title in process.name() or title in " ".join(process.cmdline()):
            return process
    raise AssertionError(f"no {title} under {server.pid}: {[p.name() for p in server.children(recursive=True)]}")


@pytest.mark.parametrize("victim_process", ["worker", "api-server"])
def test_killed_instance_is_restarted_marked_stale_meanwhile_and_converges(
    fleet: Fleet, make_lora, reference, victim_process: str
) -> None:
    """SIGKILL of the worker while the instance probes a new version (the engine dies,
    vLLM's watchdog stops the API server) or of the API server alone (its engine core and
    worker are left behind): the launcher clears what is left and restarts the instance,
    which converges on the store. A death during the probe is no verdict on the version."""
    store = CheckpointStore(fleet.root)
    lora = make_lora(106 if victim_process == "worker" else 107)
    adapter = f"restart-{victim_process}"
    victim_url = fleet.urls[1]
    server = next(
        p
        for p in psutil.Process(fleet.process.pid).children()
        if f"--port {fleet.base_port + 1}" in " ".join(p.cmdline())
    )
    left_behind = server.children(recursive=True)
    if victim_process == "worker":
        # Paused for a base-weight update, the engine holds the probe until the kill.
        assert httpx.post(f"{victim_url}/start_weight_update", json={"mode": "wait"}, timeout=60).status_code == 200
        version = store.publish(adapter, lora)
        deadline = time.monotonic() + 60
        while (
            httpx.get(f"{victim_url}/v1/lora/adapters", timeout=5).json()["adapters"].get(adapter, {}).get("phase")
            != "probe"
        ):
            assert time.monotonic() < deadline, "the victim never started probing the new version"
            time.sleep(0.1)
        _vllm_process(server, "Worker").kill()
    else:
        version = store.publish(adapter, lora)
        server.kill()
    _, alive = psutil.wait_procs([server, *left_behind], timeout=30)
    assert not alive, f"left running after the kill: {[p.name() for p in alive]}"
    victim = f"{os.uname().nodename}:{fleet.base_port + 1}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        records = {r.instance_id: r for r in fleet_status(store).instances}
        if records[victim].is_stale():
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the killed instance was never marked stale")
    status = subprocess.run(
        [sys.executable, "-m", "vllm_lora_hotswap.cli", "status", "--root", str(fleet.root)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "STALE" in status
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if (
                httpx.get(f"{victim_url}/v1/lora/adapters", timeout=2).json()["adapters"][adapter]["served_version"]
                == version
            ):
                break
        except (httpx.HTTPError, KeyError, json.JSONDecodeError):
            pass
        time.sleep(1)
    else:
        raise AssertionError("the restarted instance did not converge")
    assert fleet.tokens(victim_url, adapter, PROMPTS[0]) == (f"{adapter}@{version}", reference(lora, PROMPTS[0]))
    converged = {a.adapter: a.converged for a in fleet_status(store).adapters}
    assert converged[adapter]
    assert store.failures(adapter, version) == []


def test_ctrl_c_stops_a_starting_fleet_without_orphans(toy_model: Path, tmp_path: Path) -> None:
    process = launch(toy_model, tmp_path / "store", tmp_path / "logs", free_port(), instances=1)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(psutil.Process(process.pid).children(recursive=True)) < 3:
        time.sleep(0.5)  # API server, engine core and worker exist
    stop_and_check_no_orphans(process, signal.SIGINT)
