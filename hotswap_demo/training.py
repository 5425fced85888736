"""The training half of the demo: GRPO + HotSwapCallback + FleetRollout, with a live progress bar."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

PROMPTS = (
    "the quick brown fox",
    "hello world",
    "numbers like one two",
    "the store is",
    "a journey of",
    "rewards go up when",
    "hot swapping adapters",
    "the model said",
)


class YesReward:
    """Share of a completion's tokens that are the word " yes": verifiable, and learnable in minutes."""

    __name__ = "yes"  # TRL logs it as rewards/yes/mean

    def __init__(self, tokenizer: Any):
        self.target = tokenizer.encode(" yes", add_special_tokens=False)[-1]

    def score(self, token_ids: list[int]) -> float:
        return sum(1 for t in token_ids if t == self.target) / max(1, len(token_ids))

    def __call__(self, completions: list[Any], completion_ids: list[list[int]], **_: Any) -> list[float]:
        return [self.score(ids) for ids in completion_ids]


@dataclass
class StepRecord:
    """One GRPO step as ``steps.jsonl`` holds it."""

    step: int
    reward: float
    rollout_versions: list[str]  # the policy versions its rollouts came from (one with FleetRollout)
    staleness: int  # publications between that version and the trainer's latest when it generated
    sync_seconds: float | None  # that version: publish → served on every engine
    waited_seconds: float  # the rollout waiting for the engines to serve a version within the bound
    generate_seconds: float  # the rollout generating on the engines
    at: float  # seconds since training started

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_training(
    model: str,
    root: Path,
    adapter: str,
    urls: list[str],
    *,
    steps: int,
    learning_rate: float,
    max_staleness: int,
    console: Console,
) -> list[StepRecord]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from trl_callbacks import FleetRollout, HotSwapCallback

    reward = YesReward(AutoTokenizer.from_pretrained(model))
    hotswap = HotSwapCallback(root=root, adapter=adapter, on_improvement=False, every_n_steps=1)
    rollout = FleetRollout(urls, hotswap, max_staleness=max_staleness)
    records: list[StepRecord] = []
    started = time.time()
    progress = Progress(
        TextColumn("[bold]GRPO"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console,
    )
    task = progress.add_task("", total=steps)

    class Live(TrainerCallback):
        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
        ) -> None:
            if not logs or "reward" not in logs:
                return
            # This step's batch was generated at the step before (GRPO generates at the start of a step).
            batch = [r for r in rollout.records if r.step < state.global_step][-1]
            record = StepRecord(
                step=state.global_step,
                reward=float(logs["reward"]),
                rollout_versions=[batch.version],
                staleness=batch.staleness,
                sync_seconds=rollout.sync_seconds(batch.version),
                waited_seconds=batch.waited_seconds,
                generate_seconds=batch.generate_seconds,
                at=time.time() - started,
            )
            records.append(record)
            sync = "-" if record.sync_seconds is None else f"{record.sync_seconds:.2f} s"
            progress.console.print(
                f"step {record.step:3d}  reward {record.reward:.2f}  rollouts {adapter}@{batch.version}  "
                f"behind {batch.staleness}  sync {sync}",
                soft_wrap=True,
            )
            progress.update(task, completed=state.global_step, description=f"reward {record.reward:.2f}")

    config = GRPOConfig(
        output_dir=str(root.parent / "grpo-out"),
        max_steps=steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=32,
        num_generations=16,
        max_completion_length=8,
        temperature=1.0,
        beta=0.0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        use_vllm=False,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": list(PROMPTS) * (steps + 1)}),
        peft_config=LoraConfig(
            r=16,
            lora_alpha=32,
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
        callbacks=[hotswap, Live()],
        rollout_func=rollout,
    )
    trainer.remove_callback(PrinterCallback)  # the step lines and the progress bar say it all
    with progress:
        trainer.train()
    hotswap.flush()
    return records
