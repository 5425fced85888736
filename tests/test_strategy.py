"""LoRARLStrategy (the RL-strategy API) publishing real PEFT adapters into a real store."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from vllm_lora_hotswap.store import CheckpointStore, NotFoundError
from vllm_lora_hotswap.strategy import LoRARLStrategy, adapter_name

SEED_HYPER_PARAMETERS = {
    "rank": 8,
    "alpha": 16.0,
    "dropout": 0.1,
    "learning_rate": 1e-4,
    "target_modules": ["q_proj", "v_proj"],
}


@pytest.fixture(scope="module")
def peft_model(toy_model: Path) -> PeftModel:
    base = AutoModelForCausalLM.from_pretrained(toy_model, dtype=torch.float32)
    torch.manual_seed(1)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    return get_peft_model(base, config)


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "store")


def published_tensors(store: CheckpointStore, adapter: str, version: str) -> dict[str, torch.Tensor]:
    info = store.validate(adapter, version)
    return load_file(info.weight_file)


def assert_same_weights(saved: dict[str, torch.Tensor], model: PeftModel) -> None:
    expected = get_peft_model_state_dict(model)
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)


def test_peft_model_is_saved_off_the_event_loop_and_published(
    store: CheckpointStore, peft_model: PeftModel, toy_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[threading.Thread] = []
    save = peft_model.save_pretrained

    def recording_save(*args: Any, **kwargs: Any) -> None:
        threads.append(threading.current_thread())
        save(*args, **kwargs)

    monkeypatch.setattr(peft_model, "save_pretrained", recording_save)

    async def main() -> str:
        return await LoRARLStrategy(store).update_lora_weights(1, peft_model, reward=0.92, metadata={"episode": 1000})

    version = asyncio.run(main())
    assert threads and threads[0] is not threading.main_thread()  # asyncio.run's loop runs on the main thread
    assert store.versions("lora1") == [version]
    metadata = store.read_metadata("lora1", version)
    assert metadata["reward"] == 0.92 and metadata["episode"] == 1000
    assert_same_weights(published_tensors(store, "lora1", version), peft_model)
    # PEFT loads the published version with the same weights.
    base = AutoModelForCausalLM.from_pretrained(toy_model, dtype=torch.float32)
    assert_same_weights(
        get_peft_model_state_dict(PeftModel.from_pretrained(base, store.version_dir("lora1", version))), peft_model
    )


@pytest.mark.parametrize("form", ["tuple-LoraConfig", "dict-LoraConfig", "dict-config-dict", "tuple-to_dict"])
def test_state_dict_with_its_config(store: CheckpointStore, peft_model: PeftModel, form: str) -> None:
    state_dict = get_peft_model_state_dict(peft_model)
    config = peft_model.peft_config["default"]
    config_dict = json.loads(json.dumps(config.to_dict(), default=sorted))  # as read from adapter_config.json
    new_weights: Any = {
        "tuple-LoraConfig": (state_dict, config),
        "dict-LoraConfig": {"state_dict": state_dict, "config": config},
        "dict-config-dict": {"state_dict": state_dict, "config": config_dict},
        "tuple-to_dict": (state_dict, config.to_dict()),  # target_modules still a set
    }[form]
    version = asyncio.run(LoRARLStrategy(store).update_lora_weights(2, new_weights, reward=0.5))
    assert_same_weights(published_tensors(store, "lora2", version), peft_model)
    assert store.validate("lora2", version).config.r == 8


def test_peft_directory_is_published_as_is(store: CheckpointStore, make_lora: Any) -> None:
    source: Path = make_lora(3)
    version = asyncio.run(LoRARLStrategy(str(store.root)).update_lora_weights("policy-a", source, reward=1))
    info = store.validate("policy-a", version)
    assert info.weight_file.read_bytes() == (source / "adapter_model.safetensors").read_bytes()
    assert store.read_metadata("policy-a", version)["reward"] == 1.0


def test_seed_hyper_parameter_dict_is_refused_with_what_to_pass(store: CheckpointStore) -> None:
    strategy = LoRARLStrategy(store)
    with pytest.raises(ValueError) as caught:
        asyncio.run(strategy.update_lora_weights(1, SEED_HYPER_PARAMETERS, reward=0.92))
    message = str(caught.value)
    assert "alpha, dropout, learning_rate, rank, target_modules" in message and "without weights" in message
    assert "pass a PEFT model, a (state_dict, LoraConfig) pair" in message
    assert not store.root.exists()  # nothing was written


@pytest.mark.parametrize(
    ("new_weights", "error", "message"),
    [
        ({"state_dict": {}}, ValueError, "no 'config'"),
        ({"state_dict": {}, "config": {"r": 8}}, ValueError, "non-empty dict of tensors"),
        ({"state_dict": {"a.lora_A.weight": [1.0]}, "config": {"r": 8}}, ValueError, "maps to a list"),
        (42, TypeError, "new_weights cannot be a int"),
        ("/does/not/exist", NotFoundError, "is not a directory"),
    ],
)
def test_unusable_weights_are_refused(store: CheckpointStore, new_weights: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        asyncio.run(LoRARLStrategy(store).update_lora_weights(1, new_weights, reward=0.1))
    assert store.versions("lora1") == []


def test_state_dict_keys_with_the_adapter_name_are_refused(store: CheckpointStore, peft_model: PeftModel) -> None:
    raw = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}  # "...lora_A.default.weight"
    with pytest.raises(ValueError, match=r"still carries the adapter name: pass peft.get_peft_model_state_dict"):
        asyncio.run(LoRARLStrategy(store).update_lora_weights(1, (raw, peft_model.peft_config["default"]), reward=0.1))


def test_lora_id_maps_to_the_seed_adapter_names() -> None:
    assert adapter_name(1) == "lora1" and adapter_name(8) == "lora8" and adapter_name("lora-x") == "lora-x"
    with pytest.raises(ValueError, match="invalid adapter name '../x'"):
        adapter_name("../x")
    with pytest.raises(TypeError, match="lora_id must be an int or an adapter name, got bool"):
        adapter_name(True)


@pytest.mark.parametrize("reward", [float("nan"), float("inf"), None, "0.5", True])
def test_reward_must_be_a_finite_number(store: CheckpointStore, make_lora: Any, reward: Any) -> None:
    with pytest.raises(ValueError, match="reward must be a finite number"):
        asyncio.run(LoRARLStrategy(store).update_lora_weights(1, make_lora(3), reward=reward))


def test_training_stats(store: CheckpointStore, make_lora: Any) -> None:
    strategy = LoRARLStrategy(store)

    async def main() -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        empty = await strategy.get_training_stats()
        versions = [
            await strategy.update_lora_weights(lora_id, make_lora(3), reward)
            for lora_id, reward in ((1, 0.2), (2, 0.9), (1, 0.4), (1, -0.3))
        ]
        return empty, await strategy.get_training_stats(), versions

    empty, stats, versions = asyncio.run(main())
    nothing = {"avg": None, "max": None, "min": None, "last": None, "count": 0}
    assert empty == {"total_updates": 0, "reward_stats": nothing, "per_lora": {}}
    assert stats["total_updates"] == 4
    assert stats["reward_stats"] == pytest.approx({"avg": 0.3, "max": 0.9, "min": -0.3, "last": -0.3, "count": 4})
    assert stats["per_lora"]["lora1"] == pytest.approx(
        {"avg": 0.1, "max": 0.4, "min": -0.3, "last": -0.3, "count": 3, "last_version": versions[3]}
    )
    assert stats["per_lora"]["lora2"]["last_version"] == versions[1]
    assert store.versions("lora1") == [versions[0], versions[2], versions[3]]
    for version in store.versions("lora1"):
        store.validate("lora1", version)


class StoreScheduler:
    """A fleet scheduler in the scheduler API's shape: ``publish_lora_update(lora_id, src_ckpt_dir, metadata)``."""

    def __init__(self, store: CheckpointStore):
        self.store = store
        self.calls: list[tuple[Any, str, dict[str, Any], bool]] = []

    async def publish_lora_update(self, lora_id: Any, src_ckpt_dir: str, metadata: dict[str, Any]) -> str:
        self.calls.append((lora_id, src_ckpt_dir, metadata, Path(src_ckpt_dir).is_dir()))
        return await asyncio.to_thread(self.store.publish, f"lora{lora_id}", src_ckpt_dir, metadata)


def test_a_scheduler_receives_the_update(store: CheckpointStore, peft_model: PeftModel) -> None:
    scheduler = StoreScheduler(store)
    strategy = LoRARLStrategy(scheduler)

    async def main() -> tuple[str, dict[str, Any]]:
        version = await strategy.update_lora_weights(5, peft_model, reward=0.85, metadata={"training_step": 100})
        return version, await strategy.get_training_stats()

    version, stats = asyncio.run(main())
    [(lora_id, source, metadata, existed)] = scheduler.calls
    assert lora_id == 5 and existed and metadata == {"training_step": 100, "reward": 0.85}
    assert not Path(source).exists()  # the strategy's temporary copy is gone after the publish
    assert store.versions("lora5") == [version] and stats["per_lora"]["lora5"]["last_version"] == version
    assert_same_weights(published_tensors(store, "lora5", version), peft_model)


def test_a_target_without_an_async_publish_is_refused() -> None:
    class SyncScheduler:
        def publish_lora_update(self, lora_id: Any, src_ckpt_dir: str, metadata: dict[str, Any]) -> str:
            return "v"

    for target in (SyncScheduler(), object()):
        with pytest.raises(TypeError, match="LoRARLStrategy needs a CheckpointStore, a store path, or a scheduler"):
            LoRARLStrategy(target)  # type: ignore[arg-type]
