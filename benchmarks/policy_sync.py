"""Per-step policy sync for RL, ours against TRL's paths, and rollout tokens/s.

    python -m benchmarks.policy_sync [--quick]

On the benchmark model and one adapter (rank 16 on every linear layer, as the demo trains),
each "step" changes the adapter's weights and measures until the engines can generate with it:

- **ours**: save the adapter, publish it into the store, until *two* engines that follow the
  store serve it (the last engine's ``updated`` event; what ``HotSwapCallback`` + ``FleetRollout`` do);
- **TRL GRPOTrainer, vLLM server mode**: merge the adapter, push every base weight through
  vLLM's weight-transfer API (start, update, finish), unmerge, reset the prefix cache, on one
  engine. TRL 1.16 drives that API over NCCL only (``VLLMClient.init_communicator`` raises
  ``NotImplementedError`` for a non-CUDA device), so here the same protocol runs over the
  plugin's ``gloo`` backend: the closest path this CPU build can run;
- **TRL AsyncGRPOTrainer, adapter sync**: save ``trl-policy-v{N}``, ``POST /v1/load_lora_adapter``
  (``load_inplace`` false, the request TRL sends), unload the previous one, on one engine (TRL
  falls back to merged sync when one server has several data-parallel replicas, and its
  client talks to one server).

Rollout tokens/s: the same batch (32 prompts, 64 sampled tokens each) from the two engines
through ``/api/v1/sample`` (split as ``FleetRollout`` splits it; each engine's worker bound to its
own core) against Hugging Face ``generate`` on the PEFT model (every core), which
``GRPOTrainer(use_vllm=False)`` uses. One untimed batch warms each up.

Writes ``benchmarks/results/policy_sync.json`` and ``policy_sync.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from vllm_lora_hotswap.store import CheckpointStore

from .assets import CACHE, prepare
from .common import Server, free_port, stage
from .machine import describe

RESULTS = Path(__file__).resolve().parent / "results"
ADAPTER_SHAPE = "r16-all"
ADAPTER = "policy"
PROMPTS = ["the quick brown fox", "hello world"] * 16  # 2 prompts x 16 generations, as the demo's GRPO batch
MAX_TOKENS = 64


def _trainer_model(model_path: Path, adapter_dir: Path) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)


def _step(model: Any, generator: torch.Generator) -> None:
    """Stand-in for an optimizer step: every LoRA B matrix moves a little."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 1e-3)


def first_token(server: Server, model: str) -> None:
    """One greedy token from ``model``: the new policy has answered a request."""
    body = {"model": model, "prompt": "hello", "max_tokens": 1, "temperature": 0.0}
    server.http.post("/v1/completions", json=body).raise_for_status()


def ours(model: Any, servers: list[Server], store: CheckpointStore, steps: int) -> tuple[list[float], list[dict[str, float]]]:
    """Save + publish → served on every server (the last ``updated`` event; a probe generation on
    the new version has run on each). Also returns the last engine's swap phases at each step."""
    generator = torch.Generator().manual_seed(0)
    seconds, phases = [], []
    for _ in range(steps):
        _step(model, generator)
        started = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            version = store.publish(ADAPTER, tmp)
        for server in servers:
            server.wait_for(lambda s=server: s.adapters().get(ADAPTER, {}).get("served_version") == version,
                            f"{ADAPTER}@{version}")  # fmt: skip
        served = []
        for server in servers:
            events = server.http.get("/v1/lora/events").json()["events"]
            served.append(next(e for e in events if e["kind"] == "updated" and e["version"] == version))
        last = max(served, key=lambda e: e["at"])
        seconds.append(last["at"] - started)
        phases.append(last["timings"])
    return seconds, phases


def async_grpo(model: Any, server: Server, directory: Path, steps: int) -> list[float]:
    """AsyncGRPOTrainer's adapter sync: save a new versioned name, load it, unload the previous one;
    then one token from the new name (vLLM activates the adapter at its first request)."""
    generator = torch.Generator().manual_seed(1)
    seconds = []
    for version in range(1, steps + 1):
        _step(model, generator)
        started = time.time()
        path = directory / f"trl-policy-v{version}"
        model.save_pretrained(path, safe_serialization=True)
        response = server.http.post("/v1/load_lora_adapter", json={
            "lora_name": f"trl-policy-v{version}", "lora_path": str(path), "load_inplace": False})  # fmt: skip
        response.raise_for_status()
        if version > 1:
            server.http.post("/v1/unload_lora_adapter", json={"lora_name": f"trl-policy-v{version - 1}"}).raise_for_status()
        first_token(server, f"trl-policy-v{version}")
        seconds.append(time.time() - started)
    return seconds


def merged(model: Any, model_path: Path, server: Server, steps: int) -> list[float]:
    """GRPOTrainer's vLLM sync: merge, push every base weight (HF names), unmerge (the finish resets
    the prefix cache); then one token from the base model. ``plain`` is an HF model whose parameters
    alias the PEFT base layers' (no copy)."""
    from transformers import AutoModelForCausalLM

    from vllm_lora_hotswap.weight_sync import FleetWeightSyncClient, WeightSync

    plain = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    peft_params = {name.removeprefix("base_model.model.").replace(".base_layer", ""): p
                   for name, p in model.named_parameters() if "lora_" not in name}  # fmt: skip
    for name, param in plain.named_parameters():
        param.data = peft_params[name].data
    sync = WeightSync(FleetWeightSyncClient([server.url]), backend="gloo", master_port=free_port())
    generator = torch.Generator().manual_seed(2)
    seconds = []
    try:
        for index in range(steps):
            _step(model, generator)
            started = time.time()
            model.merge_adapter()
            try:
                sync.send(plain, weight_version=f"merged-{index}")
            finally:
                model.unmerge_adapter()
            first_token(server, str(model_path))
            seconds.append(time.time() - started)
    finally:
        sync.close()
    return seconds


def engine_rollout(servers: list[Server], repeats: int) -> dict[str, Any]:
    """Tokens/s of the batch split across the engines through /api/v1/sample."""
    chunks = [PROMPTS[: len(PROMPTS) // 2], PROMPTS[len(PROMPTS) // 2 :]]
    params = {"max_tokens": MAX_TOKENS, "temperature": 1.0, "ignore_eos": True, "logprobs": True}

    def sample(server: Server, prompts: list[str]) -> int:
        body = {"prompts": prompts, "model_id": ADAPTER, "sampling_params": params}
        response = server.http.post("/api/v1/sample", json=body)
        response.raise_for_status()
        return sum(len(s["token_ids"]) for s in response.json()["samples"])

    seconds, tokens = [], 0
    with ThreadPoolExecutor(max_workers=len(servers)) as pool:
        list(pool.map(sample, servers, chunks))  # warm-up, not timed
        for _ in range(repeats):
            started = time.perf_counter()
            tokens = sum(pool.map(sample, servers, chunks))
            seconds.append(time.perf_counter() - started)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / statistics.median(seconds)}


def hf_rollout(model: Any, model_path: Path, repeats: int) -> dict[str, Any]:
    """Tokens/s of the same batch with HF generate on the PEFT model (left-padded, sampled)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    seconds = []
    model.eval()
    with torch.no_grad():
        model.generate(**batch, do_sample=True, max_new_tokens=4, pad_token_id=tokenizer.pad_token_id)  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            out = model.generate(**batch, do_sample=True, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            seconds.append(time.perf_counter() - started)
    tokens = (out.shape[1] - batch.input_ids.shape[1]) * len(PROMPTS)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / statistics.median(seconds)}


def _summary(seconds: list[float]) -> dict[str, Any]:
    ordered = sorted(seconds)
    return {"seconds": seconds, "p50": statistics.median(ordered), "max": ordered[-1]}


def write(results: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "policy_sync.json").write_text(json.dumps(results, indent=2))
    sync, rollout = results["sync"], results["rollout"]
    lines = [
        f"Policy sync per step, {results['model']}, adapter {ADAPTER_SHAPE} ({results['adapter_bytes'] / 1e6:.1f} MB), "
        f"{results['steps']} steps each (machine: {results['machine']['cpu_model']}, load {results['load_average']})",
        "",
        "| path | engines | p50 | max |",
        "|---|---|---|---|",
    ]
    for key, label, engines in (("ours", "ours: adapter through the store", 2),
                                ("trl_merged_gloo", "TRL GRPOTrainer: merge + full-weight push (gloo, as NCCL cannot run here)", 1),
                                ("trl_async_load_lora", "TRL AsyncGRPOTrainer: /v1/load_lora_adapter", 1)):  # fmt: skip
        lines.append(f"| {label} | {engines} | {sync[key]['p50']:.2f} s | {sync[key]['max']:.2f} s |")
    phases = ", ".join(f"{phase} {1000 * value:.0f} ms" for phase, value in sync["ours"]["phases_p50"].items())
    lines += ["", f"Ours, the last engine's swap phases (p50): {phases}"]
    lines += ["", f"Rollout: {len(PROMPTS)} prompts x {MAX_TOKENS} sampled tokens", "",
              "| generation | tokens/s (median) |", "|---|---|",
              f"| two engines, /api/v1/sample | {rollout['engines']['tokens_per_s']:.0f} |",
              f"| HF generate on the PEFT model (GRPOTrainer use_vllm=False) | {rollout['hf']['tokens_per_s']:.0f} |"]  # fmt: skip
    path = out / "policy_sync.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.policy_sync", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 steps per path instead of 20, 2 rollout batches instead of 3")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output directory (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=CACHE, help="benchmark model cache (default: %(default)s)")
    options = parser.parse_args()
    steps, repeats = (5, 2) if options.quick else (20, 3)
    tmp = options.out / "tmp" / "policy_sync"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stage("assets: benchmark model and adapters")
    assets = prepare(options.cache)
    adapter_dir = assets.adapters[ADAPTER_SHAPE][0]
    root = tmp / "store"
    root.mkdir()
    env = {"VLLM_HOTSWAP_ROOT": str(root), "VLLM_HOTSWAP_POLL_INTERVAL": "1", "VLLM_HOTSWAP_RETIRE_GRACE": "1"}
    cores = sorted(os.sched_getaffinity(0))  # each engine's worker on its own core, as on its own device
    first = Server(assets.model, tmp / "engine-1.log",
                   {**env, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_CPU_OMP_THREADS_BIND": str(cores[0])},
                   ["--weight-transfer-config", '{"backend": "gloo"}'])  # fmt: skip
    second = Server(assets.model, tmp / "engine-2.log", {**env, "VLLM_CPU_OMP_THREADS_BIND": str(cores[1 % len(cores)])})
    results: dict[str, Any] = {"model": "benchmark Llama (hidden 1024, 8 layers, 415 MB)", "steps": steps,
                               "adapter_bytes": assets.adapter_bytes(ADAPTER_SHAPE), "machine": describe()}  # fmt: skip
    with ExitStack() as stack:
        stage("starting two engines following one store")
        for server in (first, second):
            stack.callback(server.stop)
        with ThreadPoolExecutor(max_workers=2) as starter:
            for started in [starter.submit(server.start) for server in (first, second)]:
                started.result()
        model = _trainer_model(assets.model, adapter_dir)
        store = CheckpointStore(root)
        results["load_average"] = [round(x, 1) for x in os.getloadavg()]
        stage(f"ours: {steps} publications → served on both engines")
        seconds, phases = ours(model, [first, second], store, steps)
        sync = {"ours": {**_summary(seconds), "phases_p50": {
            phase: statistics.median(p.get(phase, 0.0) for p in phases) for phase in phases[0]}}}  # fmt: skip
        stage(f"AsyncGRPOTrainer's /v1/load_lora_adapter path: {steps} steps on one engine")
        sync["trl_async_load_lora"] = _summary(async_grpo(model, first, tmp / "async-adapters", steps))
        stage(f"rollout tokens/s: two engines vs HF generate, {repeats} batches each")
        results["rollout"] = {"engines": engine_rollout([first, second], repeats), "hf": hf_rollout(model, assets.model, repeats)}
        stage(f"GRPOTrainer's merged path (gloo): {steps} steps on one engine")
        sync["trl_merged_gloo"] = _summary(merged(model, assets.model, first, steps))
        results["sync"] = sync
    path = write(results, options.out)
    shutil.rmtree(tmp, ignore_errors=True)
    print(path.read_text())


if __name__ == "__main__":
    main()
