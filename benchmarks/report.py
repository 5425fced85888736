"""Targets, results.md and the plots, from the results dictionary alone
(so a report can be rewritten from a results.json of the same benchmark code)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from . import base_weights, memory, parallel_swaps, plots, publish_latency, serving, slot_stall
from .assets import SHAPES
from .engine_stall import copy_floor, slot_floor
from .publish_latency import PHASES

FLOOR_FACTOR = 1.5  # our stall may be at most this times the copy floor
NATIVE_FACTOR = 3.0  # and must be at least this many times lower than the native reload


def _row(name: str, rule: str, measured: str, ratio: float, met: bool, note: str = "") -> dict[str, Any]:
    return {
        "name": name,
        "rule": rule,
        "measured": measured,
        "ratio": ratio,
        "met": met,
        "note": note,
        "summary": f"{measured} ({rule}; ratio {ratio:.2f}){' ' + note if note else ''}",
    }


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    # With events the poll interval does not count: events, not polls, should find the publish.
    polling = results["servers"]["polling"]["poll_interval_s"]
    for key, name, poll, less_probe in (
        ("events", "events", None, False),
        ("events_probe_off", "events, probe off", None, False),
        ("polling", "polling", polling, False),
        ("polling", "polling, less the probe", polling, True),
    ):
        result = results[f"latency_{key}"]
        check = publish_latency.target(result, poll, less_probe=less_probe)
        extra = f"{poll:.0f} s poll + " if poll else ""
        rule = (
            f"≤ {extra}read floor {_ms(result['read_floor_s'])} + {check['steps']} × step "
            f"{_ms(result['step']['p50'])} = {_ms(check['limit_s'])}"
        )
        if less_probe:
            note = "publish → served less the probe phase, swap by swap"
        elif result["probe"]:
            note = f"probe {_ms(result['phases']['probe'].get('p50'))}, stage {_ms(result['phases']['stage']['p50'])}"
        else:
            note = f"a server with `VLLM_HOTSWAP_PROBE=0`; stage {_ms(result['phases']['stage']['p50'])}"
        rows.append(
            _row(f"publish → served p50, {name}", rule, _ms(check["measured_s"]), check["ratio"], check["met"], note)
        )
    if "latency_polling_notified" in results:
        events = results["latency_events"]
        check = publish_latency.detect_target(events)
        rows.append(
            _row(
                "detect p50, events",
                f"≤ {_ms(check['limit_s'])}",
                _ms(check["measured_s"]),
                check["ratio"],
                check["met"],
            )
        )
        check = publish_latency.notified_target(results["latency_polling_notified"], events)
        rows.append(
            _row(
                "publish → served p50, polling + notices",
                f"≤ {publish_latency.NOTIFIED_FACTOR} × events "
                f"{_ms(events['publish_to_served']['p50'])} = {_ms(check['limit_s'])}",
                _ms(check["measured_s"]),
                check["ratio"],
                check["met"],
                f"events off, {polling:.0f} s poll: an engine on another node",
            )
        )
    check = publish_latency.stage_target(results["latency_events"])
    rows.append(
        _row(
            f"staging p50, {publish_latency.ADAPTER_SHAPE} ({_mb(results['adapters'][publish_latency.ADAPTER_SHAPE]['bytes'])})",
            f"≤ {_ms(check['limit_s'])}",
            _ms(check["measured_s"]),
            check["ratio"],
            check["met"],
        )
    )
    if "parallel" in results:
        parallel = results["parallel"]
        check = parallel_swaps.target(parallel)
        rows.append(
            _row(
                f"{parallel['adapters']} adapters published at once, all served (p50)",
                f"≤ 2 × one publish ({_ms(parallel['one']['p50'])}) = {_ms(check['limit_s'])}",
                _ms(check["measured_s"]),
                check["ratio"],
                check["met"],
            )
        )
    for shape in SHAPES:
        summary = results["stall"]["shapes"][shape.label]["summary"]
        stall = summary["ours_engine_stall"]["p50"]
        limit = FLOOR_FACTOR * copy_floor(results, shape.label)
        rows.append(
            _row(
                f"engine stall p50 vs copy floor, {shape.label}",
                f"≤ 1.5 × floor = {_ms(limit)}",
                _ms(stall),
                stall / limit,
                stall <= limit,
            )
        )
    gap = results["stall"]["baseline_gap"]
    noise = gap["p95"] - gap["p50"]
    for shape in SHAPES:
        summary = results["stall"]["shapes"][shape.label]["summary"]
        ours, native = summary["ours_external_install"].get("p50"), summary["native_external"].get("p50")
        if ours is None or native is None:
            continue
        # Both measured from outside the same way. A stall below the gaps' own spread can
        # read as ≤ 0 ms: each side counts as at least 1 ms, and such a row says so.
        speedup = max(native, 1e-3) / max(ours, 1e-3)
        note = f"within the gap noise (p95 − p50 = {_ms(noise)}): inconclusive" if max(ours, native) < noise else ""
        rows.append(
            _row(
                f"stall vs native in-place reload, {shape.label}",
                f"native ≥ 3 × ours (ours {_ms(ours)}, native {_ms(native)})",
                f"{speedup:.1f}×",
                speedup / NATIVE_FACTOR,
                speedup >= NATIVE_FACTOR,
                note,
            )
        )
    if "slot_stall" in results:
        check = slot_stall.targets(results["slot_stall"])
        worst = max(check["rows"], key=lambda row: row["ratio"])
        rows.append(
            _row(
                "install stall p50 vs any worker RPC, worst size and rank",
                f"≤ max(1 ms, 1.5 × any RPC) = {_ms(worst['limit_s'])} (r{worst['rank']}, {worst['label']})",
                _ms(worst["ours_s"]),
                worst["ratio"],
                all(row["met"] for row in check["rows"]),
            )
        )
        rows.append(
            _row(
                "install stall p50, largest ÷ smallest over sizes and ranks",
                f"≤ {slot_stall.SPREAD_LIMIT}",
                f"{check['spread']:.2f}",
                check["spread"] / slot_stall.SPREAD_LIMIT,
                check["spread_met"],
            )
        )
    checks = serving.targets(results["serving"])
    pairs = results["serving"]["paired"]["pairs"]
    check = checks["throughput"]
    rows.append(
        _row(
            "serving throughput under swaps",
            f"≥ {100 * serving.THROUGHPUT_MIN:.0f}% of no swaps",
            f"{100 * check['measured']:.1f}%",
            check["ratio"],
            check["met"],
            _interval(check, pairs, "{:.1%}"),
        )
    )
    check = checks["p99_itl"]
    rows.append(
        _row(
            "serving p99 inter-token latency under swaps",
            f"≤ {serving.ITL_P99_MAX} × no swaps",
            f"{check['measured']:.2f}×",
            check["ratio"],
            check["met"],
            _interval(check, pairs, "{:.2f}×"),
        )
    )
    check = memory.target(results["memory"])
    rows.append(
        _row(
            f"RSS after {check['last_swaps']} swaps vs after {check['reference_swaps']}",
            "within ±2%",
            f"{100 * check['measured']:+.2f}%",
            check["ratio"],
            check["met"],
        )
    )
    sync = results["weight_sync"]
    check = base_weights.target(sync)
    pushes = len(sync["push"]["seconds"])
    rows.append(
        _row(
            "gloo weight push vs plain gloo broadcast",
            "≥ 70% of the ceiling",
            f"{100 * check['measured']:.0f}%",
            check["ratio"],
            check["met"],
            _interval(check, pushes, "{:.0%}").replace("block pairs", "push/broadcast pairs"),
        )
    )
    rows += results.get("ray_fleet", {}).get("targets", [])  # written with the note by benchmarks.ray_fleet
    return rows


def _interval(check: dict[str, Any], pairs: int, fmt: str) -> str:
    if check["ci95"] is None:
        return f"{pairs} block pairs: too few for an interval"
    low, high = check["ci95"]
    note = f"95% interval {fmt.format(low)}–{fmt.format(high)} over {pairs} block pairs"
    return note + (": inconclusive" if low <= check["limit"] <= high else "")


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{1000 * seconds:.1f} ms"


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        "# vllm-lora-hotswap benchmarks",
        "",
        f"{'Quick run' if results['quick'] else 'Full run'} of {machine['date']}"
        f"{' on commit ' + machine['commit'] if machine.get('commit') else ''}, {results['wall_seconds'] / 60:.1f} min. "
        f"{machine['cpu_model']}, {machine['logical_cores']} cores, {machine['memory_bytes'] / 2**30:.0f} GiB, "
        f"GPU: {machine['gpu'] or 'none'}; torch {machine['torch']}, vLLM {machine['vllm']}, Python {machine['python']}.",
        "Load average (1 min) when each benchmark started: "
        + ", ".join(f"{name} {values[0]:.1f}" for name, values in results["load_average"].items())
        + f" (on {machine['logical_cores']} cores; above that, other work shared the machine).",
        "vLLM variables in the environment of the run (the servers inherit them): "
        + (", ".join(f"`{k}={v}`" for k, v in machine["vllm_environment"].items()) or "none (vLLM's defaults)")
        + ".",
        "",
        "## Targets",
        "",
        "The ratio is measured / limit: below 1 meets a ≤ target, above 1 meets a ≥ target.",
        "",
        *_table(
            ["target", "rule", "measured", "ratio", "result", "note"],
            [
                [
                    r["name"],
                    r["rule"],
                    r["measured"],
                    f"{r['ratio']:.2f}",
                    "met" if r["met"] else "**missed**",
                    r["note"],
                ]
                for r in results["targets"]
            ],
        ),
    ]
    lines += _latency_section(results) + _stall_section(results) + _serving_section(results)
    lines += _memory_section(results) + _weights_section(results)
    if "slot_stall" in results:
        lines += _slot_stall_section(results["slot_stall"])
    lines += ["## More", "", "- [Policy sync per RL step](policy_sync.md)"]
    if "ray_fleet" in results:
        lines += ["- [Ray fleet on a simulated two-node cluster](ray_fleet.md)"]
    return "\n".join(lines) + "\n"


def _slot_stall_section(result: dict[str, Any]) -> list[str]:
    rows = []
    for rank, per_rank in result["ranks"].items():
        for label, size in per_rank["sizes"].items():
            rows.append(
                [
                    rank,
                    label,
                    _mb(size["adapter_bytes"]),
                    _ms(size["copy_floor_s"]),
                    _ms(size["stage"]["p50"]),
                    f"{1000 * size['ours']['p50']:.2f} ms",
                    f"{1000 * size['ours']['p95']:.2f} ms",
                    f"{1000 * size['any_rpc']['p50']:.2f} ms",
                    _ms(size["native_external"].get("p50")),
                ]
            )
    installs = {
        key: sum(r["installs"][key] for r in result["ranks"].values())
        for key in ("slot_writes", "step_copies", "slots_lost")
    }
    return [
        "## 7. Install stall against adapter size and slot size",
        "",
        "Staging writes the adapter into a free LoRA slot while the engine runs; the install flips the slot's "
        "mapping, for a new slot id on the worker while the engine runs (a stage-channel message, no step boundary). "
        "Ours: how long the install could hold the engine: the flip under the slot lock that a step's start takes "
        "(an install by RPC between two steps, for want of a slot: how long it held the engine core, round trip "
        "included); any RPC: a worker RPC that only reads, timed as an RPC's hold; native: vLLM's in-place reload of "
        "the same files, from base-model streams (largest overlapping inter-token gap minus the quiet median). "
        f"{result['swaps']} swaps per row, 2 streaming clients. Over the run: {installs['slot_writes']} adapters written "
        f"into a slot while staging, {installs['step_copies']} copied in the step, {installs['slots_lost']} reserved slots "
        "taken back by vLLM.",
        "",
        *_table(
            [
                "--max-lora-rank",
                "adapter",
                "bytes",
                "copy floor",
                "stage p50",
                "ours p50",
                "ours p95",
                "any RPC p50",
                "native ext. p50",
            ],
            rows,
        ),
        "",
    ]


def _latency_section(results: dict[str, Any]) -> list[str]:
    rows = []
    for key, mode in (
        ("events", "events"),
        ("events_probe_off", "events, probe off"),
        ("polling", "polling"),
        ("polling_notified", "polling + notices"),
    ):
        if f"latency_{key}" not in results:
            continue
        r = results[f"latency_{key}"]
        rows.append(
            [
                mode,
                str(r["publish_to_served"]["n"]),
                _ms(r["publish_to_served"]["p50"]),
                _ms(r["publish_to_served"]["p95"]),
                *(_ms(r["phases"][p].get("p50")) for p in PHASES),
                _ms(r["commit_to_switch"]["p50"]),
                _ms(r["commit_to_switch_without_probe"]["p50"]),
            ]
        )
    return [
        "## 1. Publish → served",
        "",
        "From READY's mtime (the commit) to the first response generated by the new version, seen by a "
        f"tight loop of 1-token requests; adapter {results['latency_events']['adapter_shape']}. Phases are "
        "p50 of the instance's own `last_swap.timings`; commit → switch is their sum.",
        "",
        *_table(
            ["mode", "swaps", "p50", "p95", *(f"{p} p50" for p in PHASES), "commit → switch p50", "… without probe"],
            rows,
        ),
        "![publish to served by phase](latency_phases.png)",
        "",
    ]


def _stall_section(results: dict[str, Any]) -> list[str]:
    stall = results["stall"]
    rows = []
    for shape in SHAPES:
        s = stall["shapes"][shape.label]["summary"]
        rows.append(
            [
                shape.label,
                _mb(results["adapters"][shape.label]["bytes"]),
                _ms(copy_floor(results, shape.label)),
                _ms(slot_floor(results, shape.label)),
                _ms(s["ours_engine_stall"]["p50"]),
                _ms(s["ours_engine_stall"]["p95"]),
                _ms(s["ours_external_install"].get("p50")),
                _ms(s["ours_external_whole_swap"].get("p50")),
                _ms(s["native_external"].get("p50")),
                _ms(s["native_external"].get("p95")),
                _ms(s["native_request"]["p50"]),
            ]
        )
    sticky = stall["sticky_load_inplace"]
    bandwidth = results["memory_bandwidth"]
    return [
        "## 2. Engine-loop stall per swap",
        "",
        f"Copy floor: adapter bytes / {bandwidth['copy_bytes_per_s'] / 1e9:.1f} GB/s (torch `copy_` into a preallocated "
        f"tensor). Slot floor: what vLLM's `activate_adapter` writes, the whole max-rank slot "
        f"({_mb(results['slot_bytes'])}) zeroed at {bandwidth['zero_bytes_per_s'] / 1e9:.1f} GB/s plus the copy. "
        "External: largest inter-token gap of base-model streams overlapping the window minus the quiet median gap "
        f"({_ms(stall['baseline_gap']['p50'])}, p95 {_ms(stall['baseline_gap']['p95'])}: differences much below the "
        "spread are noise); ours over the install (the step right after it may also carry the probe's prefill) and "
        "over the whole swap (commit → old version retired: staging's CPU use and the probe included), native over the "
        "`/v1/load_lora_adapter` request. Swaps of the two paths alternate on one server, on the same adapter files.",
        "",
        *_table(
            [
                "adapter",
                "bytes",
                "copy floor",
                "slot floor",
                "ours stall p50",
                "ours stall p95",
                "ours ext. install p50",
                "ours ext. whole swap p50",
                "native ext. p50",
                "native ext. p95",
                "native request p50",
            ],
            rows,
        ),
        f"vLLM 0.32's sticky `load_inplace`: after one in-place reload every step that runs the adapter re-reads it "
        f"from disk. Inter-token latency on {sticky['adapter_shape']}: p50 {_ms(sticky['sticky'].get('p50'))} after an "
        f"in-place reload against {_ms(sticky['clean'].get('p50'))} for the same weights loaded plainly.",
        "",
        "![stall by adapter size](stall.png)",
        "",
    ]


def _serving_section(results: dict[str, Any]) -> list[str]:
    s = results["serving"]
    rows = [
        [
            name.replace("_", " "),
            f"{s[name]['seconds']:.0f} s",
            f"{s[name]['tokens_per_s']:.1f}",
            _ms(s[name]["itl"].get("p50")),
            _ms(s[name]["itl"].get("p99")),
        ]
        for name in ("no_swaps", "swaps")
    ]
    paired = s["paired"]
    throughput = ", ".join(f"{100 * r:.0f}%" for r in paired["throughput_ratios"])
    itl = ", ".join(f"{r:.2f}×" for r in paired["p99_itl_ratios"])
    return [
        "## 3. Serving under swaps",
        "",
        f"{s['clients']} clients streaming {s['max_tokens']}-token completions from the adapter, through "
        f"{len(s['blocks'])} blocks of {s['block_s']:.0f} s that alternate between no swaps and a new version "
        f"published every {s['swap_every_s']:.0f} s, quiet first and last (the quiet blocks publish as many "
        "versions at the same times into a store no engine watches, so the publisher's own CPU weighs on both); "
        f"the first {s['settle_s']:.0f} s of each "
        f"block are left out ({s['published']} published, {s['published_versions_served']} of them answered "
        f"requests; the pipeline skips to the newest when publishes outpace it). Stream errors: "
        f"{len(s['stream_errors'])}. The targets' figures are paired: the mean over the swap blocks of each one's "
        f"throughput ({throughput}) and p99 inter-token latency ({itl}) over the mean of the quiet blocks either "
        "side, with Student's t 95% intervals whose variance takes in the covariance of neighbouring pairs. The "
        "table pools the blocks of each kind.",
        "",
        *_table(["blocks", "measured", "output tokens/s", "ITL p50", "ITL p99"], rows),
        "![throughput over time](throughput.png)",
        "",
    ]


def _memory_section(results: dict[str, Any]) -> list[str]:
    samples = results["memory"]["samples"]
    check = memory.target(results["memory"])
    chosen = [s for s in samples if s["swaps"] in (0, check["reference_swaps"], check["last_swaps"])]
    roles = sorted({role for s in samples for role in s["rss"]})
    rows = [[str(s["swaps"]), _mb(sum(s["rss"].values())), *(_mb(s["rss"].get(r, 0)) for r in roles)] for s in chosen]
    return [
        "## 4. Host memory over swaps",
        "",
        f"RSS of the server's processes, sampled every {results['memory']['sample_every']} swaps of "
        f"{results['memory']['adapter_shape']} (old versions garbage-collected from the store as they go); "
        f"{samples[-1]['swaps']} swaps took {samples[-1]['seconds']:.0f} s.",
        "",
        *_table(["swaps", "total", *roles], rows),
        "![RSS over swaps](rss.png)",
        "",
    ]


PUSH_PHASES = {
    "spec": "trainer: the servers' parameters fetched and checked",
    "start": "trainer: /start_weight_update (pause)",
    "check": "trainer: /update_weights reaching the workers, and their check",
    "send": "trainer: every bucket and the status byte on the wire",
    "load": "trainer: waiting for the workers' load and answer",
    "finish": "trainer: /finish_weight_update (adapters back, cache reset, resume)",
    "total": "trainer: the whole push",
    "worker_receiving": "workers: receiving every bucket",
    "worker_loading": "workers: vLLM's load_weights and reload",
}


def _push_phases(phases: dict[str, float] | None) -> list[str]:
    if not phases:
        return []
    rows = [[PUSH_PHASES.get(name, name), _ms(seconds)] for name, seconds in phases.items()]
    return ["Where a push's time goes (median per phase):", "", *_table(["phase", "time"], rows)]


def _weights_section(results: dict[str, Any]) -> list[str]:
    sync, gpu = results["weight_sync"], results["gpu_copy"]
    lines = [
        "## 5. Base-weight sync",
        "",
        f"Full push of {_mb(sync['push']['bytes'])} (`WeightSync.send`, gloo): "
        f"{sync['push']['bytes_per_s'] / 1e6:.0f} MB/s (median of {len(sync['push']['seconds'])}); plain gloo broadcast "
        f"of the same bytes between two processes: {sync['ceiling']['bytes_per_s'] / 1e6:.0f} MB/s, alternated with the "
        f"pushes. NCCL: {sync['nccl']}.",
        "",
        *_push_phases(sync.get("phases")),
        "## GPU: pinned vs pageable host-to-device copy",
        "",
    ]
    if not gpu["measured"]:
        return [*lines, gpu["note"] + ".", ""]
    rows = [
        [
            label,
            _mb(r["bytes"]),
            _ms(r["pinned"]["median_s"]),
            f"{r['pinned']['bytes_per_s'] / 1e9:.1f} GB/s",
            _ms(r["pageable"]["median_s"]),
            f"{r['pageable']['bytes_per_s'] / 1e9:.1f} GB/s",
        ]
        for label, r in gpu["sizes"].items()
    ]
    return [
        *lines,
        f"Device: {gpu['device']}.",
        "",
        *_table(["adapter", "bytes", "pinned", "pinned rate", "pageable", "pageable rate"], rows),
    ]


def write(results: dict[str, Any], out: Path) -> None:
    """results.json (targets included), results.md and the plots."""
    (out / "results.json").write_text(json.dumps(results, indent=1))  # first: a report bug loses no run
    results["targets"] = targets(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    plots.write_all(results, out)


if __name__ == "__main__":  # rewrite the report from a saved results.json
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results"
    write(json.loads((directory / "results.json").read_text()), directory)
