"""Per-step policy sync for RL, ours against TRL's paths, and rollout tokens/s.

    python -m benchmarks.policy_sync [--quick]

On the benchmark model and one adapter (rank 16 on every linear layer, as the demo trains),
each "step" changes the adapter's weights and measures until the engines answer a first token
from the new weights, as the next rollout batch needs:

- **ours, 2 engines and 1 engine**: ``HotSwapCallback``'s path: save the adapter (its config and
  weights, as ``trl_callbacks.adapter_files.save_adapter`` writes them: the weights hashed while
  they are written, the engines told of them before their floats are checked) straight into the
  store's staging directory, over the spare one made after the step before
  (``CheckpointStore.prepare_next``, called when the step's first token is back, as
  ``FleetRollout`` has the callback do once a batch is back, and waited for: in an RL loop it
  is made while the trainer computes; a one-engine path without it runs beside), commit it,
  notify the engines (``POST /v1/lora/notify``), wait
  on each (``GET /v1/lora/wait?sampling=1``, as ``FleetRollout`` does), then one token from
  ``adapter@version`` through ``/api/v1/sample`` on each: a version still being probed answers
  it beside the probe, once the verdict is in. Trainer phases (save; the commit's check + hash
  + fsync and the rest of it; notice) and the last engine's swap phases (the stage's own parts
  included: read + hash, vLLM's loader, checks, slot copy) are reported. The second engine serves only the two-engine adapter
  (``VLLM_HOTSWAP_ADAPTERS``), so the one-engine adapter is followed by one engine alone;
- **TRL GRPOTrainer, vLLM server mode**: merge the adapter, push every base weight through
  vLLM's weight-transfer API (start, update, finish), unmerge, reset the prefix cache, on one
  engine. TRL 1.16 drives that API over NCCL only (``VLLMClient.init_communicator`` raises
  ``NotImplementedError`` for a non-CUDA device), so here the same protocol runs over the
  plugin's ``gloo`` backend: the closest path this CPU build can run;
- **TRL AsyncGRPOTrainer, adapter sync**: save ``trl-policy-v{N}``, ``POST /v1/load_lora_adapter``
  (``load_inplace`` false, the request TRL sends), unload the previous one, on one engine (TRL
  falls back to merged sync when one server has several data-parallel replicas, and its
  client talks to one server).

Ours on two engines, ours on one and AsyncGRPOTrainer's path run interleaved, one step of each
in turn (the first of each round moving along by one), so that the three see the machine in the
same state: on a shared machine the cost of the same work drifts over minutes.

Never more engines than cores: each engine's worker is bound to a core of its own. The engines
run with ``VLLM_HOTSWAP_IDLE_SPIN`` (``IDLE_SPIN``), as docs/configuration.md advises where a
trainer shares the engines' cores, and TRL's paths use the same engines. At the end two engines
start again without it and "ours, 2 engines" runs once more: vLLM's own one-second spin after
every step, side by side.

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
import random
import shutil
import statistics
import time
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from hotswap_devkit.server import free_port, start_all
from vllm_lora_hotswap.store import CheckpointStore
from vllm_lora_hotswap.store.records import STAGE_PHASES

from .assets import CACHE, prepare
from .common import Server, stage
from .machine import describe

RESULTS = Path(__file__).resolve().parent / "results"
PathSteps = Generator[None, None, dict[str, Any]]  # one step per next(); its result at the end
ADAPTER_SHAPE = "r16-all"
ADAPTER = "policy"  # followed by both engines
SOLO = "solo"  # followed by the first engine alone
PROMPTS = ["the quick brown fox", "hello world"] * 16  # 2 prompts x 16 generations, as the demo's GRPO batch
MAX_TOKENS = 64
# The engines' VLLM_HOTSWAP_IDLE_SPIN: the trainer shares the cores with the engines, whose
# processes would otherwise busy-poll for a second after every step (engine/idle_spin.py).
IDLE_SPIN = "0.005"
MERGED_STEPS = 20  # the merged path's steps: seconds each, and compared with nothing of ours


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


def ours(
    model: Any,
    servers: list[Server],
    store: CheckpointStore,
    adapter: str,
    steps: int,
    *,
    durable: bool = True,
    spare: bool = True,
) -> PathSteps:
    """Publish (save into staging, commit, notify) → a first token of ``adapter@version`` on
    every server, one step per ``next``; returns the trainer's phases and the last engine's
    swap phases of each step. ``durable``: the publications' (False: no fsync, as
    ``HotSwapCallback(durable=False)``). ``spare``: the next version's staging directory is made
    ahead after each commit, as the callback does (False: every weight file goes into new pages;
    give such a path a store of its own, whose ``open_version`` finds no spare)."""
    from trl_callbacks.adapter_files import save_adapter
    from vllm_lora_hotswap.notify import WAIT_PATH, CommitNotifier

    notifier = CommitNotifier([server.url for server in servers])
    generator = torch.Generator().manual_seed(0)
    seconds, trainer_phases, engine_phases = [], [], []

    def first_token_of(server: Server, version: str) -> None:
        params = {"adapter": adapter, "version": version, "timeout": 60, "sampling": True}
        server.http.get(WAIT_PATH, params=params).raise_for_status()
        body = {"prompts": ["hello"], "model_id": f"{adapter}@{version}", "sampling_params": {"max_tokens": 1}}
        server.http.post("/api/v1/sample", json=body).raise_for_status()

    with ThreadPoolExecutor(max_workers=len(servers)) as pool:
        for _ in range(steps):
            _step(model, generator)
            started = time.perf_counter()
            # HotSwapCallback's save, and its notice once the weights are written: the engines read ahead.
            staged = store.open_version(
                adapter, durable=durable, on_written=lambda staged: notifier.notify_written(adapter, staged)
            )
            save_adapter(model, staged)
            saved = time.perf_counter()
            version = staged.commit()
            committed = time.perf_counter()
            notifier.notify(adapter, version)
            noticed = time.perf_counter()
            list(pool.map(lambda server, version=version: first_token_of(server, version), servers))
            seconds.append(time.perf_counter() - started)
            sealed = staged.timings["check+hash+fsync"]  # of the commit: the files checked, hashed, synced
            trainer_phases.append(
                {
                    "save": saved - started,
                    "write+hash": staged.timings["write+hash"],
                    "check+hash+fsync": sealed,
                    "commit": committed - saved - sealed,
                    "notice": noticed - committed,
                }
            )
            served = [_updated_event(server, adapter, version) for server in servers]
            engine_phases.append(max(served, key=lambda e: e["at"])["timings"])
            if spare:  # as FleetRollout has the callback do once a batch is back
                _make_spare(store, adapter, staged.weights_digest.size)
            yield
    notifier.close()
    return {
        **_summary(seconds),
        "trainer_phases_p50": _medians(trainer_phases),
        "phases_p50": _medians(engine_phases),
        # Steps whose last engine adopted the adapter its read ahead built before the commit.
        "built_ahead_steps": sum("built_ahead" in phases for phases in engine_phases),
    }


def _make_spare(store: CheckpointStore, adapter: str, size: int) -> None:
    """The next version's spare staging directory, made before the next step of any path: in
    an RL loop it is made while the trainer computes its step, which takes far longer."""
    store.prepare_next(adapter, size)
    deadline = time.monotonic() + 30
    while not store.spare_ready(adapter) and time.monotonic() < deadline:
        time.sleep(0.005)


def _updated_event(server: Server, adapter: str, version: str) -> dict[str, Any]:
    """The server's ``updated`` event for ``adapter@version`` (it follows the first token: a
    version answered beside its probe is switched right after)."""
    deadline = time.monotonic() + 60
    while True:
        events = server.http.get("/v1/lora/events").json()["events"]
        found = [e for e in events if e["kind"] == "updated" and e["adapter"] == adapter and e["version"] == version]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{server.url} never served {adapter}@{version}")
        time.sleep(0.01)


def _medians(rows: list[dict[str, float]]) -> dict[str, float]:
    """Each phase's median over the steps that have it (``built_ahead`` only where the stage
    adopted an adapter built ahead of its commit), in the order they first appear."""
    phases = dict.fromkeys(phase for row in rows for phase in row)
    return {phase: statistics.median(row[phase] for row in rows if phase in row) for phase in phases}


def async_grpo(model: Any, server: Server, directory: Path, steps: int) -> PathSteps:
    """AsyncGRPOTrainer's adapter sync: save a new versioned name, load it, unload the previous one;
    then one token from the new name (vLLM activates the adapter at its first request). One step
    per ``next``."""
    generator = torch.Generator().manual_seed(1)
    seconds, phases = [], []
    for version in range(1, steps + 1):
        _step(model, generator)
        started = time.perf_counter()
        path = directory / f"trl-policy-v{version}"
        model.save_pretrained(path, safe_serialization=True)
        saved = time.perf_counter()
        response = server.http.post(
            "/v1/load_lora_adapter",
            json={"lora_name": f"trl-policy-v{version}", "lora_path": str(path), "load_inplace": False},
        )
        response.raise_for_status()
        if version > 1:
            server.http.post(
                "/v1/unload_lora_adapter", json={"lora_name": f"trl-policy-v{version - 1}"}
            ).raise_for_status()
        loaded = time.perf_counter()
        first_token(server, f"trl-policy-v{version}")
        seconds.append(time.perf_counter() - started)
        phases.append(
            {"save": saved - started, "load+unload": loaded - saved, "first token": time.perf_counter() - loaded}
        )
        yield
    return {**_summary(seconds), "phases_p50": _medians(phases)}


def interleaved(paths: dict[str, PathSteps]) -> dict[str, dict[str, Any]]:
    """Run the paths one step each in turn, the first of each round moving along by one, so that
    every path sees the machine as it is at the same moments; their results by name."""
    results: dict[str, dict[str, Any]] = {}
    names, round_ = list(paths), 0
    while len(results) < len(paths):
        first = round_ % len(names)
        for name in names[first:] + names[:first]:
            if name not in results:
                try:
                    next(paths[name])
                except StopIteration as done:
                    results[name] = done.value
        round_ += 1
    return {name: results[name] for name in names}


def merged(model: Any, model_path: Path, server: Server, steps: int) -> list[float]:
    """GRPOTrainer's vLLM sync: merge, push every base weight (HF names), unmerge (the finish resets
    the prefix cache); then one token from the base model. ``plain`` is an HF model whose parameters
    alias the PEFT base layers' (no copy)."""
    from transformers import AutoModelForCausalLM

    from vllm_lora_hotswap.weights.trainer import FleetWeightSyncClient, WeightSync

    plain = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    peft_params = {
        name.removeprefix("base_model.model.").replace(".base_layer", ""): p
        for name, p in model.named_parameters()
        if "lora_" not in name
    }
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
            out = model.generate(
                **batch,
                do_sample=True,
                max_new_tokens=MAX_TOKENS,
                min_new_tokens=MAX_TOKENS,
                pad_token_id=tokenizer.pad_token_id,
            )
            seconds.append(time.perf_counter() - started)
    tokens = (out.shape[1] - batch.input_ids.shape[1]) * len(PROMPTS)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / statistics.median(seconds)}


def _summary(seconds: list[float]) -> dict[str, Any]:
    ordered = sorted(seconds)
    return {"seconds": seconds, "p50": statistics.median(ordered), "max": ordered[-1]}


def ratio_interval(
    ours: list[float], trl: list[float], resamples: int = 4000, block: int = 5
) -> tuple[float, float] | None:
    """95% moving-block bootstrap interval of median(ours) ÷ median(trl) over the interleaved
    rounds (step ``i`` of both paths ran in round ``i``, so a round's pair stays together).
    Blocks of ``block`` consecutive rounds keep a drift of the machine over the run inside each
    resample, which independent rounds would not; None with fewer than three blocks of rounds."""
    if len(ours) != len(trl):
        raise ValueError(f"{len(ours)} steps of ours against {len(trl)} of TRL's: the rounds do not pair up")
    rounds = len(ours)
    if rounds < 3 * block:
        return None
    draw = random.Random(0)
    ratios = []
    for _ in range(resamples):
        picked: list[int] = []
        while len(picked) < rounds:
            start = draw.randrange(rounds - block + 1)
            picked.extend(range(start, start + block))
        picked = picked[:rounds]
        ratios.append(statistics.median(ours[i] for i in picked) / statistics.median(trl[i] for i in picked))
    ratios.sort()
    return ratios[int(0.025 * resamples)], ratios[int(0.975 * resamples) - 1]


def _interval_note(sync: dict[str, Any], key: str) -> str:
    steps = len(sync[key]["seconds"])
    interval = ratio_interval(sync[key]["seconds"], sync["trl_async_load_lora"]["seconds"])
    if interval is None:
        return f"no interval from {steps} rounds"
    low, high = interval
    return f"95% interval {low:.2f}–{high:.2f} over {steps} interleaved rounds, in blocks of 5"


def write(results: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "policy_sync.json").write_text(json.dumps(results, indent=2))
    sync, rollout = results["sync"], results["rollout"]
    lines = [
        f"Policy sync per step, {results['model']}, adapter {ADAPTER_SHAPE} ({results['adapter_bytes'] / 1e6:.1f} MB), "
        f"{results['steps']} steps each ({results.get('merged_steps', results['steps'])} on the merged path; machine: {results['machine']['cpu_model']}, load {results['load_average']}"
        f"{', commit ' + results['machine']['commit'] if results['machine'].get('commit') else ''})",
        "",
        f"The engines run with `VLLM_HOTSWAP_IDLE_SPIN={IDLE_SPIN}` (both paths use the same engines), "
        "except the row that says otherwise: two engines started again without it. Ours on two engines, "
        "ours on one and TRL AsyncGRPO's path ran interleaved, one step of each in turn.",
        "",
        "| path | engines | p50 | max |",
        "|---|---|---|---|",
    ]
    rows = (
        ("ours", "ours: adapter through the store", 2),
        ("ours_vllm_spin", "ours, engines with vLLM's own idle spin (1 s)", 2),
        ("ours_one_engine", "ours: adapter through the store", 1),
        ("ours_not_durable", "ours, `durable=False` (no fsync)", 2),
        ("ours_one_engine_not_durable", "ours, `durable=False` (no fsync)", 1),
        ("ours_one_engine_no_spare", "ours, no spare staging directory (each weight file into new pages)", 1),
        ("trl_async_load_lora", "TRL AsyncGRPOTrainer: /v1/load_lora_adapter", 1),
        ("trl_merged_gloo", "TRL GRPOTrainer: merge + full-weight push (gloo, as NCCL cannot run here)", 1),
    )
    for key, label, engines in rows:
        if key not in sync:
            continue
        lines.append(f"| {label} | {engines} | {sync[key]['p50']:.3f} s | {sync[key]['max']:.3f} s |")
    trl = sync["trl_async_load_lora"]["p50"]
    two, one = sync["ours"]["p50"] / trl, sync["ours_one_engine"]["p50"] / trl
    lines += [
        "",
        f"Ours ÷ TRL AsyncGRPO (p50): {two:.2f} on 2 engines ({_interval_note(sync, 'ours')}; target ≤ 1.0), "
        f"{one:.2f} on 1 engine ({_interval_note(sync, 'ours_one_engine')}; target ≤ 0.8); "
        f"{sync['ours_vllm_spin']['p50'] / trl:.2f} on 2 engines with vLLM's own idle spin",
    ]
    if "ours_not_durable" in sync:
        lines[-1] += (
            f"; with `durable=False` {sync['ours_not_durable']['p50'] / trl:.2f} on 2 engines, "
            f"{sync['ours_one_engine_not_durable']['p50'] / trl:.2f} on 1"
        )
    if "ours_one_engine_no_spare" in sync:
        lines[-1] += f"; without the spare staging directory {sync['ours_one_engine_no_spare']['p50'] / trl:.2f} on 1"
    lines += ["", *_phase_table(sync)]
    adopted = ", ".join(
        f"{label} {sync[key]['built_ahead_steps']} of {results['steps']}"
        for key, label in (("ours", "2 engines"), ("ours_one_engine", "1 engine"), ("ours_vllm_spin", "vLLM's spin"))
        if "built_ahead_steps" in sync[key]
    )
    if adopted:
        lines += ["", f"Steps whose last engine adopted the adapter its read ahead built before the commit: {adopted}"]
    trl_phases = ", ".join(
        f"{phase} {1000 * value:.1f} ms" for phase, value in sync["trl_async_load_lora"]["phases_p50"].items()
    )
    lines += ["", f"TRL AsyncGRPOTrainer on 1 engine, p50: {trl_phases}"]
    lines += [
        "",
        f"Rollout: {len(PROMPTS)} prompts x {MAX_TOKENS} sampled tokens",
        "",
        "| generation | tokens/s (median) |",
        "|---|---|",
        f"| two engines, /api/v1/sample | {rollout['engines']['tokens_per_s']:.0f} |",
        f"| HF generate on the PEFT model (GRPOTrainer use_vllm=False) | {rollout['hf']['tokens_per_s']:.0f} |",
    ]
    path = out / "policy_sync.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# The parts of the stage the workers report (a phase without a label here fails at import).
_STAGE_LABELS = {
    "stage_read": "read the weight file and hash it against READY, or wait for the read ahead",
    "stage_load": "vLLM's loader builds the adapter from those bytes",
    "stage_check": "NaN/inf and shape checks, q/k/v packing, scaling",
    "stage_slot": "copy into a free LoRA slot",
}
# Where one step of ours goes, in order: the trainer's phases, then the last engine's swap.
PHASE_ROWS = (
    ("trainer", "save", "trainer: save the adapter into the store's staging directory, hashed as written"),
    ("trainer", "write+hash", "\u2003of which the weight file written, hashed and checked for NaN/inf"),
    (
        "trainer",
        "check+hash+fsync",
        "trainer: commit, files checked and fsynced (the weights' fsync began with the save)",
    ),
    ("trainer", "commit", "trainer: commit, metadata, READY, rename, directory fsyncs"),
    ("trainer", "notice", "trainer: notices sent (returns at once)"),
    ("engine", "detect", "engine: detect (commit → the pipeline starts)"),
    ("engine", "validate", "engine: validate (READY, config, header)"),
    ("engine", "stage", "engine: stage, of which:"),
    *(("engine", phase, "\u2003" + _STAGE_LABELS[phase]) for phase in STAGE_PHASES),
    ("engine", "built_ahead", "\u2003(off the path: built and written into a slot ahead of the commit)"),
    ("engine", "install", "engine: install (the slot flipped in)"),
    ("engine", "engine_stall", "\u2003of which the engine loop was held"),
    ("engine", "probe", "engine: probe (the first token of the first batch)"),
    ("engine", "switch", "engine: switch (traffic to the new version)"),
)


def _phase_table(sync: dict[str, Any]) -> list[str]:
    columns = tuple(
        (key, label)
        for key, label in (
            ("ours", "2 engines"),
            ("ours_one_engine", "1 engine"),
            ("ours_one_engine_not_durable", "1 engine, durable=False"),
            ("ours_one_engine_no_spare", "1 engine, no spare"),
            ("ours_vllm_spin", "2 engines, vLLM's spin"),
        )
        if key in sync
    )
    lines = [
        "Where a step of ours goes (p50 of each phase, ms; the engine's phases are the last engine's to serve):",
        "",
        "| phase | " + " | ".join(label for _, label in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for side, phase, label in PHASE_ROWS:
        cells = []
        for key, _ in columns:
            measured = sync[key]["trainer_phases_p50" if side == "trainer" else "phases_p50"]
            cells.append(f"{1000 * measured[phase]:.1f}" if phase in measured else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.policy_sync", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="5 steps per path instead of 40, 2 rollout batches instead of 3"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="output directory (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=CACHE, help="benchmark model cache (default: %(default)s)")
    options = parser.parse_args()
    print(run(options.out, options.cache, quick=options.quick).read_text())


def _engines(model: Path, root: Path, tmp: Path, idle_spin: str | None) -> tuple[Server, Server]:
    """Two engines on one store, each worker on a core of its own; the first also takes TRL's
    requests (runtime LoRA loading, the gloo weight-transfer backend), the second follows
    ``ADAPTER`` only. ``idle_spin``: their ``VLLM_HOTSWAP_IDLE_SPIN`` (None: vLLM's own spin)."""
    env = {"VLLM_HOTSWAP_ROOT": str(root), "VLLM_HOTSWAP_POLL_INTERVAL": "1", "VLLM_HOTSWAP_RETIRE_GRACE": "1"}
    if idle_spin is not None:
        env["VLLM_HOTSWAP_IDLE_SPIN"] = idle_spin
    cores = sorted(os.sched_getaffinity(0))  # each engine's worker on its own core, as on its own device
    tag = "" if idle_spin is not None else "-vllm-spin"
    first = Server(
        model,
        tmp / f"engine-1{tag}.log",
        {**env, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_CPU_OMP_THREADS_BIND": str(cores[0])},
        ["--weight-transfer-config", '{"backend": "gloo"}'],
    )
    second_env = {**env, "VLLM_CPU_OMP_THREADS_BIND": str(cores[1 % len(cores)]), "VLLM_HOTSWAP_ADAPTERS": ADAPTER}
    return first, Server(model, tmp / f"engine-2{tag}.log", second_env)


def run(out: Path, cache: Path = CACHE, *, quick: bool = False) -> Path:
    """Every path side by side in one run; writes ``out/policy_sync.json`` and ``.md`` (its path)."""
    steps, repeats = (5, 2) if quick else (40, 3)
    tmp = out / "tmp" / "policy_sync"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stage("assets: benchmark model and adapters")
    assets = prepare(cache)
    adapter_dir = assets.adapters[ADAPTER_SHAPE][0]
    root = tmp / "store"
    root.mkdir()
    first, second = _engines(assets.model, root, tmp, IDLE_SPIN)
    results: dict[str, Any] = {
        "model": "benchmark Llama (hidden 1024, 8 layers, 415 MB)",
        "steps": steps,
        "adapter_bytes": assets.adapter_bytes(ADAPTER_SHAPE),
        "machine": describe(),
    }
    with ExitStack() as stack:
        stage("starting two engines following one store")
        for server in (first, second):
            stack.callback(server.stop)
        start_all((first, second))
        model = _trainer_model(assets.model, adapter_dir)
        store = CheckpointStore(root)
        results["load_average"] = [round(x, 1) for x in os.getloadavg()]
        stage(f"ours on both engines, ours on one, AsyncGRPOTrainer's path on one: {steps} steps each, interleaved")
        sync = interleaved(
            {
                "ours": ours(model, [first, second], store, ADAPTER, steps),
                "ours_one_engine": ours(model, [first], store, SOLO, steps),
                "ours_not_durable": ours(model, [first, second], store, ADAPTER, steps, durable=False),
                "ours_one_engine_not_durable": ours(model, [first], store, SOLO, steps, durable=False),
                "ours_one_engine_no_spare": ours(model, [first], CheckpointStore(root), SOLO, steps, spare=False),
                "trl_async_load_lora": async_grpo(model, first, tmp / "async-adapters", steps),
            }
        )
        stage(f"rollout tokens/s: two engines vs HF generate, {repeats} batches each")
        results["rollout"] = {
            "engines": engine_rollout([first, second], repeats),
            "hf": hf_rollout(model, assets.model, repeats),
        }
        merged_steps = results["merged_steps"] = min(steps, MERGED_STEPS)
        stage(f"GRPOTrainer's merged path (gloo): {merged_steps} steps on one engine")
        sync["trl_merged_gloo"] = _summary(merged(model, assets.model, first, merged_steps))
    with ExitStack() as stack:
        stage(f"ours again, engines with vLLM's own idle spin: {steps} publications → both engines")
        default_spin = _engines(assets.model, root, tmp, None)
        for server in default_spin:
            stack.callback(server.stop)
        start_all(default_spin)
        sync["ours_vllm_spin"] = interleaved({"ours": ours(model, list(default_spin), store, ADAPTER, steps)})["ours"]
    results["sync"] = sync
    path = write(results, out)
    shutil.rmtree(tmp, ignore_errors=True)
    return path


if __name__ == "__main__":
    main()
