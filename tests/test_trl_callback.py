"""HotSwapCallback: a real TRL GRPO run on CPU publishing into a real store, plus its decision logic.

The GRPO run (a tiny random Llama, LoRA on q/v) carries three callbacks at once, each with its own
store, so one training run checks improvement publishing (max and min), the schedule, train-end
publishing and gc. The publications are checked against ``trainer.state.log_history``; every
version is validated by the store and loaded with PEFT. ZeRO-3/FSDP are covered by their detection
only (one CPU process here).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from trl_callbacks import HotSwapCallback, sharded_training
from trl_callbacks.sharding import FSDP, ZERO3
from vllm_lora_hotswap.store import CheckpointStore

LORA = {"r": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
MAX_STEPS = 8


def reward_yes(completions: list[str], **_: Any) -> list[float]:
    """Share of completion characters in "yes": varies from sample to sample and step to step."""
    return [sum(c in "yes" for c in text) / max(len(text), 1) for text in completions]


def expected_improvements(history: list[dict[str, Any]], metric: str, mode: str, min_delta: float) -> list[int]:
    """Steps whose logged ``metric`` beat the best so far (an independent re-implementation)."""
    best, steps = None, []
    for entry in history:
        value = entry.get(metric)
        if value is None or not math.isfinite(value):
            continue
        if best is None or (value > best + min_delta if mode == "max" else value < best - min_delta):
            best = value
            steps.append(entry["step"])
    return steps


@pytest.fixture(scope="module")
def grpo(toy_model: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    root = tmp_path_factory.mktemp("grpo")
    callbacks = {
        "best": HotSwapCallback(root / "best", "lora1", metric="reward", mode="max", min_delta=0.005),
        "lowest": HotSwapCallback(root / "lowest", "lora2", metric="rewards/reward_yes/mean", mode="min"),
        "scheduled": HotSwapCallback(
            root / "scheduled",
            "lora3",
            on_improvement=False,
            every_n_steps=3,
            publish_on_train_end=True,
            keep=2,
            metadata={"run": "test"},
        ),
    }
    args = GRPOConfig(
        output_dir=str(root / "out"),
        use_vllm=False,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        max_steps=MAX_STEPS,
        logging_steps=1,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
    )
    dataset = Dataset.from_dict({"prompt": ["the quick brown fox", "hello world", "rewards go up", "yes yes"] * 4})
    trainer = GRPOTrainer(
        model=str(toy_model),
        reward_funcs=reward_yes,
        args=args,
        train_dataset=dataset,
        peft_config=LoraConfig(**LORA),
        callbacks=list(callbacks.values()),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == list(range(1, MAX_STEPS + 1))
    return SimpleNamespace(trainer=trainer, callbacks=callbacks, logs=logs, root=root)


def check_loads_with_peft(toy_model: Path, directory: Path) -> dict[str, torch.Tensor]:
    """PEFT loads the version and ends up with exactly the tensors of its weight file."""
    base = AutoModelForCausalLM.from_pretrained(toy_model, dtype=torch.float32)
    loaded = get_peft_model_state_dict(PeftModel.from_pretrained(base, directory))
    saved = load_file(directory / "adapter_model.safetensors")
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    return saved


@pytest.mark.parametrize(
    ("name", "metric", "mode", "min_delta"),
    [
        ("best", "reward", "max", 0.005),
        ("lowest", "rewards/reward_yes/mean", "min", 0.0),
    ],
)
def test_grpo_publishes_exactly_at_improvements(
    grpo: SimpleNamespace, toy_model: Path, name: str, metric: str, mode: str, min_delta: float
) -> None:
    callback: HotSwapCallback = grpo.callbacks[name]
    assert callback.errors == []
    expected = expected_improvements(grpo.logs, metric, mode, min_delta)
    assert [p.step for p in callback.publications] == expected
    store = callback.store
    assert store is not None and callback.adapter is not None
    versions = store.versions(callback.adapter)
    assert [p.version for p in callback.publications] == versions  # committed in order
    by_step = {entry["step"]: entry for entry in grpo.logs}
    for publication, version in zip(callback.publications, versions, strict=True):
        log = by_step[publication.step]
        metadata = store.read_metadata(callback.adapter, version)
        assert metadata["metric"] == metric and metadata["value"] == log[metric] == metadata["reward"]
        assert metadata["global_step"] == metadata["metric_step"] == publication.step
        assert metadata["epoch"] == log["epoch"] and metadata["reasons"] == ["improvement"]
        assert metadata["base_model"] == str(toy_model) and metadata["peft_config"]["r"] == 8
        assert metadata["published_at"] and publication.blocked_seconds < 5.0
        info = store.validate(callback.adapter, version)
        check_loads_with_peft(toy_model, info.path)
    print(f"\n{name}: step blocked {[round(p.blocked_seconds * 1000, 1) for p in callback.publications]} ms")


def test_grpo_schedule_train_end_and_gc(grpo: SimpleNamespace, toy_model: Path) -> None:
    callback: HotSwapCallback = grpo.callbacks["scheduled"]
    assert callback.errors == []
    assert [(p.step, p.reasons) for p in callback.publications] == [
        (3, ("schedule",)),
        (6, ("schedule",)),
        (MAX_STEPS, ("train_end",)),
    ]
    store = callback.store
    assert store is not None
    versions = store.versions("lora3")  # keep=2: the first scheduled version was collected
    assert versions == [p.version for p in callback.publications[1:]]
    steps = [store.read_metadata("lora3", v)["global_step"] for v in versions]
    assert steps == [6, MAX_STEPS]
    final = store.read_metadata("lora3", versions[-1])
    assert final["run"] == "test" and "reward" in final and final["value"] == grpo.logs[-1]["reward"]
    # The train-end version holds exactly the trained weights, and training changed them.
    saved = check_loads_with_peft(toy_model, store.validate("lora3", versions[-1]).path)
    trained = get_peft_model_state_dict(grpo.trainer.model)
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k].cpu()) for k in saved)
    earlier = load_file(store.version_dir("lora3", versions[0]) / "adapter_model.safetensors")
    assert any(not torch.equal(earlier[k], saved[k]) for k in saved)


def test_grpo_with_an_unknown_metric_fails_naming_the_logged_ones(toy_model: Path, tmp_path: Path) -> None:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        use_vllm=False,
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=4,
        max_steps=2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=str(toy_model),
        reward_funcs=reward_yes,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["hello world", "yes yes"]}),
        peft_config=LoraConfig(**LORA),
        callbacks=[HotSwapCallback(tmp_path / "store", "lora1", metric="rewards/reward_no/mean")],
    )
    with pytest.raises(ValueError, match=r"'rewards/reward_no/mean' is not in .*rewards/reward_yes/mean"):
        trainer.train()
    assert not (tmp_path / "store" / "lora1").exists()


# -- the decision logic, driven event by event -------------------------------------------------


@pytest.fixture(scope="module")
def peft_model(toy_model: Path) -> PeftModel:
    base = AutoModelForCausalLM.from_pretrained(toy_model, dtype=torch.float32)
    return get_peft_model(base, LoraConfig(**LORA))


class Driver:
    """Calls a callback's events the way a Trainer's CallbackHandler does (real state objects)."""

    def __init__(self, callback: HotSwapCallback, model: Any, main_process: bool = True):
        self.callback, self.model = callback, model
        self.args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
        self.state = TrainerState(is_world_process_zero=main_process, is_local_process_zero=main_process)
        self.control = TrainerControl()
        callback.on_train_begin(self.args, self.state, self.control, model=model)

    def step(self, value: object = None, *, log: bool = True, **logs: Any) -> None:
        self.state.global_step += 1
        self.state.epoch = self.state.global_step / 10
        self.control.should_log = log
        self.callback.on_step_end(self.args, self.state, self.control, model=self.model)
        if log:
            entry = {"loss": 0.0, "reward": value, **logs, "epoch": self.state.epoch}
            self.callback.on_log(self.args, self.state, self.control, logs=entry, model=self.model)

    def end(self) -> None:
        self.callback.on_train_end(self.args, self.state, self.control, model=self.model)


def published(callback: HotSwapCallback) -> list[tuple[int, float | None, tuple[str, ...]]]:
    return [(p.step, p.value, p.reasons) for p in callback.publications]


def test_nan_and_none_values_are_skipped(tmp_path: Path, peft_model: PeftModel) -> None:
    callback = HotSwapCallback(tmp_path, "lora1")
    driver = Driver(callback, peft_model)
    for value in (None, float("nan"), 0.5, float("nan"), None, 0.4, float("inf"), 0.7, 0.7):
        driver.step(value)
    driver.end()
    assert published(callback) == [(3, 0.5, ("improvement",)), (8, 0.7, ("improvement",))]
    assert callback.best == 0.7 and callback.errors == []
    assert [m.metadata["value"] for m in callback.store.entries("lora1")] == [0.5, 0.7]  # type: ignore[union-attr]


def test_min_delta_and_min_mode(tmp_path: Path, peft_model: PeftModel) -> None:
    callback = HotSwapCallback(tmp_path, "lora1", metric="kl", mode="min", min_delta=0.1)
    driver = Driver(callback, peft_model)
    for value in (1.0, 0.95, 0.85, 0.9, 0.7):
        driver.step(kl=value)
    driver.end()
    assert [(step, value) for step, value, _ in published(callback)] == [(1, 1.0), (3, 0.85), (5, 0.7)]
    assert "reward" not in callback.store.read_metadata("lora1", callback.publications[0].version)  # type: ignore


def test_schedule_without_a_log_at_that_step_publishes_at_step_end(tmp_path: Path, peft_model: PeftModel) -> None:
    callback = HotSwapCallback(tmp_path, "lora1", every_n_steps=2)
    driver = Driver(callback, peft_model)
    driver.step(0.5)  # improvement
    driver.step(log=False)  # schedule, no log this step: published now with the last value
    driver.step(0.4)
    driver.step(0.9)  # schedule and improvement at one logged step: one version with both reasons
    driver.step(log=False)
    driver.step(log=False)  # schedule
    driver.end()
    assert published(callback) == [
        (1, 0.5, ("improvement",)),
        (2, 0.5, ("schedule",)),
        (4, 0.9, ("improvement", "schedule")),
        (6, 0.9, ("schedule",)),
    ]
    metadata = callback.store.read_metadata("lora1", callback.publications[1].version)  # type: ignore[union-attr]
    assert metadata["global_step"] == 2 and metadata["metric_step"] == 1 and metadata["value"] == 0.5


def test_train_end_does_not_republish_a_published_step(tmp_path: Path, peft_model: PeftModel) -> None:
    callback = HotSwapCallback(tmp_path, "lora1", publish_on_train_end=True)
    driver = Driver(callback, peft_model)
    driver.step(0.5)
    driver.end()
    driver.step(0.4)
    driver.end()
    assert published(callback) == [(1, 0.5, ("improvement",)), (2, 0.4, ("train_end",))]
    assert len(callback.store.versions("lora1")) == 2  # type: ignore[union-attr]


def test_non_main_process_decides_but_never_writes(tmp_path: Path, peft_model: PeftModel) -> None:
    root = tmp_path / "store"
    callback = HotSwapCallback(root, "lora1", every_n_steps=1, publish_on_train_end=True)
    driver = Driver(callback, peft_model, main_process=False)
    for value in (0.1, 0.2, 0.3):
        driver.step(value)
    driver.end()
    assert callback.best == 0.3  # ranks keep the same decision state (collective gathers stay in step)
    assert callback.publications == [] and callback.errors == [] and not root.exists()


def test_background_errors_are_recorded_not_raised(tmp_path: Path, peft_model: PeftModel) -> None:
    root = tmp_path / "store"
    callback = HotSwapCallback(root, "lora1")
    driver = Driver(callback, peft_model)
    os.rmdir(root)
    root.write_text("the store was replaced by a file")  # every publish now fails in the background
    driver.step(0.5)
    driver.step(0.6)
    driver.end()  # waits for both; raises nothing
    assert [p.step for p in callback.publications] == [1, 2]
    assert len(callback.errors) == 2 and all(p.version is None and p.error for p in callback.publications)
    assert "publishing lora1" in callback.publications[0].error  # type: ignore[operator]


def test_unknown_metric_raises_on_the_first_log_of_its_kind(tmp_path: Path, peft_model: PeftModel) -> None:
    callback = HotSwapCallback(tmp_path, "lora1", metric="eval_reward")
    driver = Driver(callback, peft_model)
    driver.step(0.5)  # a training log says nothing about an eval_ metric
    summary = {"train_runtime": 1.0, "train_loss": 0.0, "epoch": 1.0}
    callback.on_log(driver.args, driver.state, driver.control, logs=summary, model=peft_model)
    eval_logs = {"eval_loss": 0.1, "eval_rewards/f/mean": 0.2, "eval_reward_std": 0.0, "epoch": 1.0}
    with pytest.raises(ValueError, match=r"'eval_reward' is not in the trainer's logs; logged: eval_loss, eval_rew"):
        callback.on_log(driver.args, driver.state, driver.control, logs=eval_logs, model=peft_model)
    callback.on_log(
        driver.args, driver.state, driver.control, logs={**eval_logs, "eval_reward": 0.3}, model=peft_model
    )
    callback.flush()
    assert [p.value for p in callback.publications] == [0.3]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "maximum"}, "mode must be 'max' or 'min', got 'maximum'"),
        ({"min_delta": -0.1}, "min_delta must be a finite number >= 0, got -0.1"),
        ({"min_delta": float("nan")}, "min_delta must be a finite number >= 0, got nan"),
        ({"every_n_steps": 0}, "every_n_steps must be a positive integer or None, got 0"),
        ({"keep": 1.5}, "keep must be a positive integer or None, got 1.5"),
        ({"metric": ""}, "metric must be a non-empty metric name, got ''"),
        ({"on_improvement": "yes"}, "on_improvement must be True or False, got 'yes'"),
        ({"durable": "no"}, "durable must be True or False, got 'no'"),
        ({"on_improvement": False}, "nothing would be published"),
        ({"metadata": {"version": 3}}, r"metadata keys \['version'\] are reserved"),
        ({"metadata": {"reward": 3}}, r"metadata keys \['reward'\] are reserved"),
        ({"metadata": {"x": float("nan")}}, "metadata must be JSON-serialisable"),
        ({"adapter": "../escape"}, "invalid adapter name '../escape'"),
        ({"adapter": None}, "root and adapter go together"),
        ({"weight_sync": object()}, "weight_sync must have an update_model_weights"),
    ],
)
def test_bad_options_are_refused_naming_the_argument(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    options: dict[str, Any] = {"root": tmp_path, "adapter": "lora1", **kwargs}
    with pytest.raises(ValueError, match=message):
        HotSwapCallback(**options)


def test_full_fine_tuning_needs_a_weight_sync_client(tmp_path: Path, toy_model: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(toy_model, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"needs a PEFT LoRA model \(pass peft_config=LoraConfig"):
        Driver(HotSwapCallback(tmp_path, "lora1"), model)

    class RecordingSync:
        def __init__(self) -> None:
            self.calls: list[Any] = []

        def update_model_weights(self, model: Any) -> None:
            self.calls.append(model)

    sync = RecordingSync()
    callback = HotSwapCallback(weight_sync=sync)
    driver = Driver(callback, model)
    for value in (0.5, 0.4, 0.6):
        driver.step(value)
    driver.end()
    assert sync.calls == [model, model] and [p.step for p in callback.publications] == [1, 3]
    assert all(p.version is None for p in callback.publications) and not list(tmp_path.iterdir())


def test_wrapped_models_are_unwrapped_and_non_lora_adapters_refused(
    tmp_path: Path, peft_model: PeftModel, toy_model: Path
) -> None:
    callback = HotSwapCallback(tmp_path, "lora1")
    driver = Driver(callback, torch.nn.DataParallel(peft_model))  # as a DataParallel/DDP wrapper hands it over
    driver.step(0.5)
    driver.end()
    assert callback.errors == [] and len(callback.store.versions("lora1")) == 1  # type: ignore[union-attr]

    from peft import IA3Config

    base = AutoModelForCausalLM.from_pretrained(toy_model, dtype=torch.float32)
    ia3 = get_peft_model(base, IA3Config(target_modules=["q_proj", "v_proj"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="publishes LoRA adapters; the model's adapter is IA3"):
        Driver(HotSwapCallback(tmp_path, "lora2"), ia3)


def test_sharded_training_detection() -> None:
    def deepspeed(stage: int) -> SimpleNamespace:
        return SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage), fsdp_plugin=None)

    assert sharded_training(None) is None
    assert sharded_training(SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=None)) is None
    assert sharded_training(deepspeed(2)) is None
    assert sharded_training(deepspeed(3)) == ZERO3
    assert (
        sharded_training(SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=SimpleNamespace(fsdp_version=2))) == FSDP
    )


def test_fsdp_and_sharded_weight_sync_are_refused(tmp_path: Path, peft_model: PeftModel, toy_model: Path) -> None:
    with pytest.raises(ValueError, match="does not support FSDP"):
        HotSwapCallback(tmp_path, "lora1").check_setup(peft_model, FSDP)
    HotSwapCallback(tmp_path, "lora1").check_setup(peft_model, ZERO3)  # gathered at each publication
    full = AutoModelForCausalLM.from_pretrained(toy_model, dtype=torch.float32)
    sync = SimpleNamespace(update_model_weights=lambda model: None)
    with pytest.raises(ValueError, match="weight_sync with deepspeed-zero3 is not supported"):
        HotSwapCallback(weight_sync=sync).check_setup(full, ZERO3)


def test_publication_metadata_is_json(tmp_path: Path, peft_model: PeftModel) -> None:
    callback = HotSwapCallback(tmp_path, "lora1", metadata={"experiment": {"name": "x", "seed": 1}})
    driver = Driver(callback, peft_model)
    driver.step(0.25)
    driver.end()
    version = callback.publications[0].version
    raw = json.loads((callback.store.version_dir("lora1", version) / "metadata.json").read_text())  # type: ignore
    assert raw["experiment"] == {"name": "x", "seed": 1} and raw["reward"] == 0.25
    assert raw["peft_config"]["target_modules"] and raw["peft_config"]["peft_type"] == "LORA"


class _ServedCheck(TrainerCallback):
    """After each log that published (the publisher runs first), wait, training paused
    mid-run, until the running engine serves the new version, and record what it answers."""

    def __init__(self, publisher: HotSwapCallback, engine: Any, prompt: str):
        self.publisher, self.engine, self.prompt = publisher, engine, prompt
        self.seen: list[tuple[int, str, tuple[str, list[int]]]] = []

    def on_log(self, args: Any, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        if len(self.publisher.publications) == len(self.seen):  # this log published nothing
            return
        assert self.publisher.flush(60)
        version = self.publisher.publications[-1].version
        assert version is not None, self.publisher.publications[-1].error
        self.engine.wait_served(self.publisher.adapter, version)
        self.seen.append((state.global_step, version, self.engine.tokens(self.publisher.adapter, self.prompt)))


@pytest.mark.engine
def test_a_running_engine_serves_each_version_while_training_goes_on(
    engine: Any, shared_store: CheckpointStore, toy_model: Path, tmp_path: Path, reference
) -> None:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from tests.conftest import PROMPTS

    publisher = HotSwapCallback(shared_store.root, "trl-live", on_improvement=False, every_n_steps=2)
    check = _ServedCheck(publisher, engine, PROMPTS[0])
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        use_vllm=False,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        max_steps=6,
        logging_steps=1,
        learning_rate=5e-2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=1,
        disable_tqdm=True,
    )
    dataset = Dataset.from_dict({"prompt": ["the quick brown fox", "hello world", "yes yes"] * 4})
    trainer = GRPOTrainer(
        model=str(toy_model),
        reward_funcs=reward_yes,
        args=args,
        train_dataset=dataset,
        peft_config=LoraConfig(**LORA),
        callbacks=[publisher, check],
    )
    trainer.train()
    assert [step for step, _, _ in check.seen] == [2, 4, 6]
    versions = [version for _, version, _ in check.seen]
    assert len(set(versions)) == 3
    for _, version, served in check.seen:
        directory = shared_store.version_dir("trl-live", version)
        assert served == (f"trl-live@{version}", reference(directory, PROMPTS[0]))


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None])
def test_save_adapter_writes_what_peft_writes_but_the_model_card(
    tmp_path: Path, toy_model: Path, task_type: str | None
) -> None:
    from trl_callbacks.adapter_files import save_adapter

    base = AutoModelForCausalLM.from_pretrained(toy_model, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(**{**LORA, "task_type": task_type}), adapter_name="policy")
    model.add_adapter("other", LoraConfig(**{**LORA, "r": 4}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param))
    model.save_pretrained(tmp_path / "peft", selected_adapters=["policy"], safe_serialization=True)
    save_adapter(model, tmp_path / "ours")

    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    peft_dir = tmp_path / "peft" / "policy"  # PEFT puts a non-default adapter in a folder of its name
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text()) == json.loads(
        (peft_dir / "adapter_config.json").read_text()
    )
    ours, theirs = (
        load_file(tmp_path / "ours" / "adapter_model.safetensors"),
        load_file(peft_dir / "adapter_model.safetensors"),
    )
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert model.peft_config["policy"].inference_mode is False  # the live config is left as it was
    check_loads_with_peft(toy_model, tmp_path / "ours")
    with pytest.raises(ValueError, match="'missing' is not an adapter of this model"):
        save_adapter(model, tmp_path / "x", "missing")

    # Into a store's staged version (what the callback does): the weights written from the
    # tensors' memory and hashed as they are written; the same two files, byte for byte.
    store = CheckpointStore(tmp_path / "store")
    with store.open_version("policy") as staged:
        save_adapter(model, staged)
    assert staged.timings["write+hash"] > 0
    committed = store.version_dir("policy", staged.version)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (committed / name).read_bytes() == (tmp_path / "ours" / name).read_bytes()
    store.validate("policy", staged.version)  # READY's sha256 is the file's


def test_save_adapter_picks_the_tensors_peft_picks_after_updates_and_changes(
    toy_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From its second call, ``save_adapter`` takes the adapter's tensors by parameter name
    instead of asking PEFT: it must agree with PEFT after an update in place, a parameter
    replaced, a module to save, a config changed and an adapter added."""
    import trl_callbacks.adapter_files as adapter_files
    from trl_callbacks.adapter_files import _ADAPTER_KEYS

    asked = []
    peft_pick = adapter_files.get_peft_model_state_dict

    def counted(*args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs.get("adapter_name"))
        return peft_pick(*args, **kwargs)

    def agrees(model: Any, name: str = "policy") -> None:
        theirs = peft_pick(model, adapter_name=name)
        for _ in range(2):  # the first call may ask PEFT; the second takes the recorded names
            ours = _ADAPTER_KEYS.state_dict(model, name)
            assert list(ours) == list(theirs)
            assert all(ours[k].data_ptr() == theirs[k].data_ptr() and torch.equal(ours[k], theirs[k]) for k in ours)

    monkeypatch.setattr(adapter_files, "get_peft_model_state_dict", counted)

    base = AutoModelForCausalLM.from_pretrained(toy_model, dtype=torch.float32)
    config = LoraConfig(**{**LORA, "modules_to_save": ["lm_head"]})
    model = get_peft_model(base, config, adapter_name="policy")
    agrees(model)
    assert _ADAPTER_KEYS._known[model]["policy"][1] is not None  # every tensor is a parameter: recorded
    assert asked == ["policy"]  # PEFT asked once; the second call took the parameters by name

    with torch.no_grad():  # an optimizer step: in place
        for param in model.parameters():
            if param.requires_grad:
                param.add_(1.0)
    agrees(model)

    layer = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["policy"]
    layer.weight = torch.nn.Parameter(torch.randn_like(layer.weight))  # a new tensor under the same name
    agrees(model)

    model.peft_config["policy"].lora_alpha = 32  # the same structure, another config: PEFT asked again
    agrees(model)
    assert asked == ["policy", "policy"]

    model.add_adapter("other", LoraConfig(**{**LORA, "r": 4, "target_modules": ["k_proj"]}))
    agrees(model)
    agrees(model, "other")


def _spare_made(store: Any, adapter: str = "lora1") -> bool:
    deadline = time.monotonic() + 120  # the helper writes at idle priority: only on a free core
    while not store.spare_ready(adapter):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_the_next_version_is_saved_over_a_spare_made_after_the_commit_or_once_the_rollout_asks(
    tmp_path: Path, peft_model: PeftModel
) -> None:
    callback = HotSwapCallback(tmp_path / "a", "lora1", every_n_steps=1)
    driver = Driver(callback, peft_model)
    driver.step(0.5)
    assert callback.flush(60) and _spare_made(callback.store)
    spare = callback.store.spare_directory("lora1")  # type: ignore[union-attr]
    inode = os.stat(spare).st_ino
    driver.step(0.6)
    assert callback.flush(60) and callback.errors == []
    second = callback.store.version_dir("lora1", callback.publications[-1].version)  # type: ignore[union-attr]
    assert os.stat(second).st_ino == inode  # the spare staging directory became the version
    callback.store.validate("lora1", second.name)  # type: ignore[union-attr]

    # Under FleetRollout (spares_when_asked) nothing is made until the rollout asks.
    later = HotSwapCallback(tmp_path / "b", "lora1", every_n_steps=1)
    later.make_spares_when_asked()
    driver = Driver(later, peft_model)
    driver.step(0.5)
    assert later.flush(60)
    assert not later.store.spare_ready("lora1") and later.store.spare_directory("lora1") is None  # type: ignore[union-attr]
    assert later.prepare_spare() and _spare_made(later.store)
