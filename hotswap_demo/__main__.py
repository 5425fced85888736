"""``make demo``: GRPO whose rollouts two vLLM engines generate, following the store.

1. start two vLLM servers with the plugin, following a fresh store;
2. train a LoRA with TRL's GRPOTrainer on a verifiable toy reward (the share of " yes"
   tokens a completion holds): ``HotSwapCallback`` publishes the adapter after every step
   and ``FleetRollout`` generates every batch on both engines, on one policy version
   within ``--max-staleness`` publications of the latest;
3. show each step's reward, the version of its rollouts and the sync time (publish →
   served on both engines), with a progress bar;
4. end with a table, ``steps.jsonl`` (one object per step) and a PNG plot.

By default everything is local and tiny (a random Llama lightly pretrained on a few
sentences, so it writes corpus-like text). ``--model``, ``--root``, ``--steps`` and
``--port`` point it at a real model and store.
"""

from __future__ import annotations

import argparse
import os
import shutil
import warnings
from contextlib import ExitStack
from pathlib import Path

from rich.console import Console

from .report import write_report
from .training import run_training

ADAPTER = "demo"
ENGINES = 2
# 1 GiB of KV cache on CPU builds (ignored by CUDA builds). A version every step: host slots
# for several at once (--max-cpu-loras), replaced versions retired fast, and a short poll,
# which is also when a swap that found no free slot tries again. The trainer shares the cores
# with the engines: their processes sleep 5 ms after a step instead of busy-polling for a second.
SERVER_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
    "VLLM_HOTSWAP_POLL_INTERVAL": "0.5",
    "VLLM_HOTSWAP_RETIRE_GRACE": "0.25",
    "VLLM_HOTSWAP_IDLE_SPIN": "0.005",
}
SERVER_ARGS = [
    "--enable-lora",
    "--max-lora-rank",
    "16",
    "--max-loras",
    "2",
    "--max-cpu-loras",
    "8",
    "--dtype",
    "float32",
    "--max-model-len",
    "256",
    "--enforce-eager",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hotswap_demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="base model (HF id or path); default: a tiny local model made here")
    parser.add_argument("--root", type=Path, help="checkpoint store root; default: <out>/store (emptied first)")
    parser.add_argument("--steps", type=int, default=30, help="GRPO steps (default 30)")
    parser.add_argument(
        "--port", type=int, default=8000, help="port of the first engine; the others follow (default 8000)"
    )
    parser.add_argument(
        "--max-staleness",
        type=int,
        default=0,
        help="publications a rollout's version may lag behind the latest (default 0: on-policy)",
    )
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="where results go (default demo-output)")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func's "experimental" warning
    args = parse_args(argv)
    console = Console()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or str(_tiny_model(out / "model", console))
    root = (args.root or out / "store").resolve()
    if args.root is None:
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)

    from vllm_lora_hotswap.fleet.launcher import Launcher

    engine_cores, trainer_cores = _split_cores()
    with ExitStack() as stack:
        console.print(
            f"[bold]1.[/bold] starting {ENGINES} vLLM engines with the plugin on ports "
            f"{args.port}–{args.port + ENGINES - 1}, following {root}"
        )
        launchers = []  # one launcher per engine: each starts one server on its own port
        env = {**SERVER_ENV, **({"VLLM_CPU_OMP_THREADS_BIND": engine_cores} if engine_cores else {})}
        for i in range(ENGINES):
            launcher = Launcher(
                model,
                instances=1,
                base_port=args.port + i,
                host="127.0.0.1",
                root=str(root),
                log_dir=out / "logs" / f"engine-{i + 1}",
                extra_args=SERVER_ARGS,
                restart=False,
                env=env,
            )
            stack.callback(launcher.stop)
            launcher.start()
            launchers.append(launcher)
        with console.status(f"waiting for the engines (about a minute on {os.cpu_count()} CPU cores)…"):
            for launcher in launchers:
                if not launcher.wait_healthy(600):
                    raise SystemExit(f"a vLLM engine did not start; see {launcher.instances[0].log_path}")
        urls = [launcher.instances[0].url for launcher in launchers]
        if trainer_cores:
            import torch

            os.sched_setaffinity(0, trainer_cores)
            torch.set_num_threads(len(trainer_cores))

        console.print(
            f"[bold]2.[/bold] GRPO on [cyan]{ADAPTER}[/cyan]: a publication every step, rollouts from "
            f"both engines (max staleness {args.max_staleness})"
        )
        steps = run_training(
            model,
            root,
            ADAPTER,
            urls,
            steps=args.steps,
            learning_rate=args.learning_rate,
            max_staleness=args.max_staleness,
            console=console,
        )

        console.print("[bold]3.[/bold] results")
        steps_path, plot_path = write_report(out, steps, args.max_staleness, console)
        console.print(f"steps: {steps_path}\nplot:  {plot_path}")


def _split_cores() -> tuple[str | None, set[int] | None]:
    """On a CPU-only machine, the engines' workers get the first half of the cores and training
    the rest: both spin their threads, and sharing cores slows each down several times."""
    cores = sorted(os.sched_getaffinity(0))
    if shutil.which("nvidia-smi") or len(cores) < 2:
        return None, None
    half = len(cores) // 2
    return ",".join(map(str, cores[:half])), set(cores[half:])


def _tiny_model(path: Path, console: Console) -> Path:
    from hotswap_devkit.toy_models import ToyModelSpec, make_model, pretrain

    if not (path / "config.json").exists():
        with console.status("making a tiny Llama and pretraining it on a few sentences…"):
            # A small init (near-uniform outputs) then a few corpus steps: it writes
            # corpus-like text, " yes" included now and then, so RL has a start.
            make_model(path, ToyModelSpec(initializer_range=0.02))
            pretrain(path, steps=25)
    return path


if __name__ == "__main__":
    main()
