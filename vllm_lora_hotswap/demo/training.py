"""The training half of the demo: GRPO + HotSwapCallback, with a live progress bar."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

PROMPTS = ("the quick brown fox", "hello world", "numbers like one two", "the store is",
           "a journey of", "rewards go up when", "hot swapping adapters", "the model said")  # fmt: skip


class YesReward:
    """Share of a completion's tokens that are the word " yes": verifiable, and learnable in minutes."""

    __name__ = "yes"  # TRL logs it as rewards/yes/mean

    def __init__(self, tokenizer: Any):
        self.target = tokenizer.encode(" yes", add_special_tokens=False)[-1]

    def score(self, token_ids: list[int]) -> float:
        return sum(1 for t in token_ids if t == self.target) / max(1, len(token_ids))

    def __call__(self, completions: list[Any], completion_ids: list[list[int]], **_: Any) -> list[float]:
        return [self.score(ids) for ids in completion_ids]


def yes_reward(model: str) -> YesReward:
    from transformers import AutoTokenizer

    return YesReward(AutoTokenizer.from_pretrained(model))


@dataclass
class TrainingResult:
    started_at: float
    logs: list[tuple[float, int, float]] = field(default_factory=list)  # (time, step, reward)
    publications: list[dict[str, Any]] = field(default_factory=list)  # version, step, reward, blocked_seconds
    final_version: str | None = None


def run_training(model: str, root: Path, adapter: str, reward: YesReward, *, steps: int, learning_rate: float,
                 console: Console, sampler: Any) -> TrainingResult:  # fmt: skip
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from trl_callbacks import HotSwapCallback

    result = TrainingResult(started_at=time.time())
    hotswap = HotSwapCallback(root=root, adapter=adapter, metric="reward", mode="max", min_delta=0.02,
                              publish_on_train_end=True)  # fmt: skip
    progress = Progress(TextColumn("[bold]GRPO"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.description}"), console=console)  # fmt: skip
    task = progress.add_task("", total=steps)

    class Live(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
            if logs and "reward" in logs:
                result.logs.append((time.time(), state.global_step, float(logs["reward"])))
                progress.update(task, completed=state.global_step, description=(
                    f"trainer reward {logs['reward']:.2f} | served {sampler.status_line()}"))

    config = GRPOConfig(
        output_dir=str(root.parent / "grpo-out"), max_steps=steps, learning_rate=learning_rate,
        per_device_train_batch_size=32, num_generations=16, max_completion_length=8, temperature=1.0,
        beta=0.0, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
        gradient_checkpointing=False, disable_tqdm=True,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=config,
        train_dataset=Dataset.from_dict({"prompt": list(PROMPTS) * (steps + 1)}),
        peft_config=LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM",
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        callbacks=[hotswap, Live()],
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # the progress bar says it all
    with progress:
        trainer.train()
    hotswap.flush()
    result.publications = [
        {"version": p.version, "step": p.step, "reward": p.value, "blocked_seconds": p.blocked_seconds}
        for p in hotswap.publications if p.version
    ]  # fmt: skip
    result.final_version = result.publications[-1]["version"] if result.publications else None
    return result
