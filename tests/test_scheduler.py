"""The fleet scheduler's own decisions, with the instances' HTTP answers given directly."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake import write_lora
from vllm_lora_hotswap.fleet.scheduler import DistributedLoRAScheduler
from vllm_lora_hotswap.store import CheckpointStore, InstanceRecord


def test_blue_green_is_refused_at_once_when_no_instance_would_follow_the_green_name(tmp_path: Path) -> None:
    scheduler = DistributedLoRAScheduler(base_port=9000, num_gpus=2, cpfs_base=str(tmp_path))

    async def instance(url: str) -> dict[str, Any]:  # what `/v1/lora/adapters` answers with 'lora{i}'
        index = int(url.rsplit(":", 1)[1]) - 9000 + 1
        record = InstanceRecord(instance_id=f"node:{index}", url=url, heartbeat=time.time(), follows=[f"lora{index}"])
        return {"url": url, "healthy": True, **record.model_dump(mode="json")}

    scheduler._instance = instance  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=r"node:1 \(follows lora1\) do not: .*'lora1\*'"):
        asyncio.run(scheduler.blue_green_update(1, write_lora(tmp_path / "src"), timeout=60))
    # Refused before anything was published, so before any wait for convergence.
    assert not CheckpointStore(tmp_path).adapter_dir("lora1-green").exists()


def test_the_store_comes_from_the_caller_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_HOTSWAP_ROOT", raising=False)
    with pytest.raises(ValueError, match="pass cpfs_base= or set VLLM_HOTSWAP_ROOT"):
        DistributedLoRAScheduler()
    monkeypatch.setenv("VLLM_HOTSWAP_ROOT", str(tmp_path))
    assert DistributedLoRAScheduler().store.root == tmp_path
