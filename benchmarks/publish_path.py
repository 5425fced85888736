"""The publish path at both ends: the trainer's save + hash + commit, and each engine's validate + stage.

    python -m benchmarks.publish_path trainer [--publishes 20]     # both trainer paths, side by side
    python -m benchmarks.publish_path engine [--swaps 20] [--label L]  # a real engine on the test model

**trainer** publishes the same PEFT model ``--publishes`` times by each path, alternating, for the
small test adapter (the tests' tiny Llama, r8 on q/v) and a ~10 MB one (r16 on every linear layer
of the benchmark Llama's shape, the adapter of ``benchmarks.policy_sync``), and reports p50 ms:

- ``copy``: ``save_pretrained`` into a temporary directory, then ``CheckpointStore.publish`` (copy
  into ``.staging/`` while hashing, fsync, commit): what ``HotSwapCallback`` did before;
- ``direct``: ``save_pretrained`` straight into the store's staging directory, then hash the freshly
  written files (page cache) and check them in one pass, fsync, commit;
- ``lean-file``: ``direct`` with ``trl_callbacks.adapter_files.save_adapter`` into the staging
  directory instead of ``save_pretrained`` (the same two files, no model card);
- ``lean``: ``save_adapter`` into the staged version itself: ``StagedVersion.write_weights``
  writes the weight file from the tensors' memory while the same bytes are hashed and checked,
  then fsyncs it in the background, so the commit only waits for that fsync;
- ``lean-spare``: ``lean``, then ``CheckpointStore.prepare_next`` after each commit, so the next
  weight file is written over a file of zeros made ahead at idle priority (pages the page cache
  holds already): what ``HotSwapCallback`` does.

**engine** starts one plugin engine on the tests' tiny Llama (the engine-starting part: run it under
``flock /tmp/hotswap-engine.lock``), publishes ``--swaps`` versions of each adapter shape and reports
the last swap's ``validate`` and ``stage`` phases (p50 ms) as the engine's status records them.
Results go to ``benchmarks/results/publish_path-<part>[-<label>].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from vllm_lora_hotswap.store import CheckpointStore

RESULTS = Path(__file__).resolve().parent / "results"
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _p50_ms(values: list[float]) -> float:
    return round(1000 * statistics.median(values), 2)


# -- trainer side ----------------------------------------------------------------------------
def _peft_model(spec: Any, rank: int, targets: tuple[str, ...]) -> Any:
    """A random Llama of ``spec``'s shape (built in memory, never saved) with a LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    lora = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False, task_type="CAUSAL_LM"
    )
    return get_peft_model(base, lora)


def _nudge(model: Any) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(1e-3)


def _copy_path(model: Any, store: CheckpointStore, adapter: str) -> dict[str, float]:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hotswap-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        saved = time.perf_counter()
        store.publish(adapter, tmp, {"bench": True})
        done = time.perf_counter()
    return {"save": saved - started, "hash+commit": done - saved, "total": done - started}


def _direct_path(model: Any, store: CheckpointStore, adapter: str, *, how: str = "peft") -> dict[str, float]:
    """``how``: "peft" (``save_pretrained``), "file" (``save_adapter`` into the staging directory),
    "memory" (``save_adapter`` into the staged version) or "spare" ("memory", then the next
    version's spare staging directory made ahead)."""
    from trl_callbacks.adapter_files import save_adapter

    started = time.perf_counter()
    staged = store.open_version(adapter)
    if how in ("memory", "spare"):
        save_adapter(model, staged)
    elif how == "file":
        save_adapter(model, staged.path)
    else:
        model.save_pretrained(staged.path, safe_serialization=True)
    saved = time.perf_counter()
    staged.commit({"bench": True})
    done = time.perf_counter()
    if how == "spare":
        store.prepare_next(adapter, staged.weights_digest.size)
    return {
        "save": saved - started,
        "hash+commit": done - saved,
        "total": done - started,
        "of which check+hash+fsync": staged.timings["check+hash+fsync"],
    }


def trainer(publishes: int) -> dict[str, Any]:
    from hotswap_devkit.toy_models import BENCH_MODEL, TEST_MODEL

    shapes = {
        "small (tiny Llama, r8 q/v)": (TEST_MODEL, 8, ("q_proj", "v_proj")),
        "~10 MB (bench Llama shape, r16 all linear)": (BENCH_MODEL, 16, ALL_LINEAR),
    }
    paths = {
        "copy": _copy_path,
        "direct": _direct_path,
        "lean-file": lambda model, store, adapter: _direct_path(model, store, adapter, how="file"),
        "lean": lambda model, store, adapter: _direct_path(model, store, adapter, how="memory"),
        "lean-spare": lambda model, store, adapter: _direct_path(model, store, adapter, how="spare"),
    }
    results: dict[str, Any] = {}
    for label, (spec, rank, targets) in shapes.items():
        model = _peft_model(spec, rank, targets)
        with tempfile.TemporaryDirectory(prefix="publish-path-") as tmp:
            store = CheckpointStore(Path(tmp) / "store")
            samples: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
            for name, path in paths.items():  # one untimed publish each: imports, first files
                path(model, store, name)
            for _ in range(publishes):
                for name, path in paths.items():
                    _nudge(model)
                    samples[name].append(path(model, store, name))
            size = os.stat(store.version_dir("copy", store.versions("copy")[-1]) / "adapter_model.safetensors").st_size
        results[label] = {
            "weight_bytes": size,
            **{name: {key: _p50_ms([s[key] for s in runs]) for key in runs[0]} for name, runs in samples.items()},
        }
        print(label, json.dumps(results[label], indent=1), flush=True)
    return results


# -- engine side -----------------------------------------------------------------------------
def engine(swaps: int) -> dict[str, Any]:
    from hotswap_devkit.toy_models import make_adapter, make_model

    from .common import Server

    shapes = {"r8 q/v (the tests' adapter)": (8, ("q_proj", "v_proj")), "r16 all linear": (16, ALL_LINEAR)}
    tmp = Path(tempfile.mkdtemp(prefix="publish-path-engine-"))
    try:
        model = make_model(tmp / "tiny-llama")
        root = tmp / "store"
        root.mkdir()
        env = {
            "VLLM_HOTSWAP_ROOT": str(root),
            "VLLM_HOTSWAP_POLL_INTERVAL": "0.5",
            "VLLM_HOTSWAP_RETIRE_GRACE": "0.25",
        }
        server = Server(model, tmp / "engine.log", env, ["--max-lora-rank", "16", "--max-model-len", "256"])
        store = CheckpointStore(root)
        results: dict[str, Any] = {}
        with server:
            for label, (rank, targets) in shapes.items():
                sources = [make_adapter(model, tmp / f"{rank}-{seed}", seed, rank, targets) for seed in (1, 2)]
                adapter = f"bench-r{rank}-{len(targets)}"
                timings = []
                for i in range(swaps + 1):
                    version = store.publish(adapter, sources[i % 2])
                    status = server.wait_swapped(adapter, version)
                    if i:  # the first swap of an adapter warms its path up
                        timings.append(status["last_swap"]["timings"])
                size = os.stat(sources[0] / "adapter_model.safetensors").st_size
                results[label] = {
                    "weight_bytes": size,
                    **{phase: _p50_ms([t.get(phase, 0.0) for t in timings]) for phase in ("validate", "stage")},
                }
                results[label]["validate+stage"] = _p50_ms(
                    [t.get("validate", 0.0) + t.get("stage", 0.0) for t in timings]
                )
                print(label, results[label], flush=True)
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.publish_path", description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("trainer", "engine"))
    parser.add_argument("--publishes", type=int, default=20)
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--label", default="", help="suffix of the result file, e.g. 'before'")
    options = parser.parse_args()
    results = trainer(options.publishes) if options.part == "trainer" else engine(options.swaps)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"publish_path-{options.part}{'-' + options.label if options.label else ''}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
