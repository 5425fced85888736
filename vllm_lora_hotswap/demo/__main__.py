"""``make demo``: GRPO training publishes LoRA versions that a running vLLM server serves.

1. start a vLLM server with the plugin, following a fresh store;
2. train a LoRA with TRL's GRPOTrainer and ``HotSwapCallback`` on a verifiable toy
   reward (the share of " yes" tokens a completion holds);
3. meanwhile a client samples the served adapter and scores it with the same reward;
4. show progress live, one line per swap;
5. end with a table and a PNG plot of trainer and served reward against time.

By default everything is local and tiny (a random Llama lightly pretrained on a few
sentences, so it writes corpus-like text). ``--model``, ``--root``, ``--steps`` and
``--port`` point it at a real model and store.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
import warnings
from contextlib import ExitStack
from pathlib import Path

from rich.console import Console

from .report import write_report
from .sampler import ServedRewardSampler
from .training import PROMPTS, run_training, yes_reward

ADAPTER = "demo"
# 1 GiB of KV cache on CPU builds (ignored by CUDA builds); poll often, retire fast.
SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
              "VLLM_HOTSWAP_POLL_INTERVAL": "1", "VLLM_HOTSWAP_RETIRE_GRACE": "1"}  # fmt: skip
SERVER_ARGS = ["--enable-lora", "--max-lora-rank", "16", "--max-loras", "2", "--max-cpu-loras", "4",
               "--dtype", "float32", "--max-model-len", "256", "--enforce-eager"]  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vllm_lora_hotswap.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="base model (HF id or path); default: a tiny local model made here")
    parser.add_argument("--root", type=Path, help="checkpoint store root; default: <out>/store (emptied first)")
    parser.add_argument("--steps", type=int, default=150, help="GRPO steps (default 150)")
    parser.add_argument("--port", type=int, default=8000, help="port of the vLLM server (default 8000)")
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="where results go (default demo-output)")
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions")
    args = parse_args(argv)
    console = Console()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or str(_tiny_model(out / "model", console))
    root = (args.root or out / "store").resolve()
    if args.root is None:
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)

    from ..fleet.launcher import Launcher

    server_cores, trainer_cores = _split_cores()
    env = {**SERVER_ENV, **({"VLLM_CPU_OMP_THREADS_BIND": server_cores} if server_cores else {})}
    with ExitStack() as stack:
        console.print(f"[bold]1.[/bold] starting vLLM with the plugin on port {args.port}, following {root}")
        launcher = Launcher(model, instances=1, base_port=args.port, host="127.0.0.1", root=str(root),
                            log_dir=out / "logs", extra_args=SERVER_ARGS, restart=False, env=env)  # fmt: skip
        stack.callback(launcher.stop)
        launcher.start()
        with console.status("waiting for the server (about a minute on 2 CPU cores)…"):
            if not launcher.wait_healthy(600):
                raise SystemExit(f"the vLLM server did not start; see {launcher.instances[0].log_path}")
        url = launcher.instances[0].url
        if trainer_cores:
            import torch

            os.sched_setaffinity(0, trainer_cores)
            torch.set_num_threads(len(trainer_cores))

        console.print(f"[bold]2.[/bold] sampling [cyan]{ADAPTER}[/cyan] from the server while GRPO trains it")
        reward = yes_reward(model)
        sampler = ServedRewardSampler(url, ADAPTER, model, PROMPTS, reward, console)
        sampler.start()
        stack.callback(sampler.stop)
        training = run_training(model, root, ADAPTER, reward, steps=args.steps, learning_rate=args.learning_rate,
                                console=console, sampler=sampler)  # fmt: skip
        sampler.wait_for_version(training.final_version, timeout=60)
        time.sleep(2)  # a few samples of the last version
        sampler.stop()

        console.print("[bold]3.[/bold] results")
        table_path, plot_path, json_path = write_report(out, training, sampler, console)
        console.print(f"table: {table_path}\nplot:  {plot_path}\nraw:   {json_path}")


def _split_cores() -> tuple[str | None, set[int] | None]:
    """On a CPU-only machine, the vLLM worker gets the first half of the cores and training
    the rest: both spin their threads, and sharing cores slows each down several times."""
    cores = sorted(os.sched_getaffinity(0))
    if shutil.which("nvidia-smi") or len(cores) < 2:
        return None, None
    half = len(cores) // 2
    return ",".join(map(str, cores[:half])), set(cores[half:])


def _tiny_model(path: Path, console: Console) -> Path:
    from ..toy_models import ToyModelSpec, make_model, pretrain

    if not (path / "config.json").exists():
        with console.status("making a tiny Llama and pretraining it on a few sentences…"):
            # A small init (near-uniform outputs) then a few corpus steps: it writes
            # corpus-like text, " yes" included now and then, so RL has a start.
            make_model(path, ToyModelSpec(initializer_range=0.02))
            pretrain(path, steps=25)
    return path


if __name__ == "__main__":
    main()
