"""The four PNG plots of results.md (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

from .assets import SHAPES  # noqa: E402
from .engine_stall import copy_floor, slot_floor  # noqa: E402
from .publish_latency import PHASES  # noqa: E402


def write_all(results: dict[str, Any], out: Path) -> None:
    for name, draw in (
        ("latency_phases.png", latency_phases),
        ("stall.png", stall),
        ("throughput.png", throughput),
        ("rss.png", rss),
    ):
        figure = draw(results)
        figure.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(figure)


def latency_phases(results: dict[str, Any]) -> plt.Figure:
    """Per mode, the distribution of every phase and of publish → served (log scale)."""
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for axis, mode in zip(axes, ("events", "polling")):
        swaps = results[f"latency_{mode}"]["swaps"]
        columns = [[1000 * s["timings"].get(p, 0.0) for s in swaps] for p in PHASES]
        columns.append([1000 * s["publish_to_served_s"] for s in swaps])
        axis.boxplot(columns, whis=(5, 95), showfliers=True)
        axis.set_xticks(range(1, len(PHASES) + 2), [*PHASES, "publish→\nserved"])
        axis.set_yscale("log")
        axis.set_title(f"{mode}: {len(swaps)} swaps (whiskers p5–p95)")
        axis.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("ms")
    return figure


def stall(results: dict[str, Any]) -> plt.Figure:
    """p50 stall per adapter size: ours (worker-side and external), native, and the floors."""
    figure, axis = plt.subplots(figsize=(8, 5))
    shapes = sorted(SHAPES, key=lambda s: results["adapters"][s.label]["bytes"])
    sizes = [results["adapters"][s.label]["bytes"] / 1e6 for s in shapes]

    def series(key: str) -> list[float]:
        # An external stall within the gap noise can be ≤ 0: no point on a log scale.
        values = [results["stall"]["shapes"][s.label]["summary"][key].get("p50") for s in shapes]
        return [1000 * v if v is not None and v > 0 else float("nan") for v in values]

    axis.plot(sizes, series("ours_engine_stall"), "o-", label="ours: engine_stall (install, worker-side)")
    axis.plot(sizes, series("ours_external_install"), "s--", label="ours: external gap over the install")
    axis.plot(sizes, series("native_external"), "^-", label="native load_inplace: external gap")
    axis.plot(sizes, [1000 * copy_floor(results, s.label) for s in shapes], "k:", label="copy floor (adapter bytes)")
    axis.plot(
        sizes,
        [1000 * slot_floor(results, s.label) for s in shapes],
        "k-.",
        label="slot floor (zero max-rank slot + copy)",
    )
    for size, shape in zip(sizes, shapes):
        axis.annotate(
            shape.label,
            (size, 1000 * copy_floor(results, shape.label)),
            textcoords="offset points",
            xytext=(0, -12),
            ha="center",
            fontsize=7,
        )
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("adapter size (MB)")
    axis.set_ylabel("stall per swap, p50 (ms)")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    return figure


def throughput(results: dict[str, Any]) -> plt.Figure:
    """Output tokens/s in 1 s bins; the swap blocks shaded, every publish marked."""
    serving = results["serving"]
    timeline = serving["timeline"]
    figure, axis = plt.subplots(figsize=(11, 4))
    axis.step(timeline["bin_start_s"], timeline["tokens_per_s"], where="post", label="output tokens/s")
    publishes = serving["publish_times"]
    swap_blocks = [block for block in serving["blocks"] if block["kind"] == "swaps"]
    for index, block in enumerate(swap_blocks):
        axis.axvspan(
            block["start_s"] - serving["settle_s"],
            block["end_s"],
            color="orange",
            alpha=0.12,
            label="swap blocks" if index == 0 else None,
        )
    for index, moment in enumerate(publishes):
        axis.axvline(moment, color="red", alpha=0.4, linewidth=0.8, label="publish" if index == 0 else None)
    for name, color in (("no_swaps", "green"), ("swaps", "red")):
        axis.axhline(
            serving[name]["tokens_per_s"],
            color=color,
            linestyle="--",
            alpha=0.6,
            label=f"mean, {name.replace('_', ' ')}",
        )
    axis.set_xlabel("seconds")
    axis.set_ylabel("output tokens/s")
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower left")
    return figure


def rss(results: dict[str, Any]) -> plt.Figure:
    """RSS of the server's processes (and their sum) against the number of swaps."""
    samples = results["memory"]["samples"]
    swaps = [s["swaps"] for s in samples]
    roles = sorted({role for s in samples for role in s["rss"]})
    figure, axis = plt.subplots(figsize=(9, 4.5))
    axis.plot(swaps, [sum(s["rss"].values()) / 2**20 for s in samples], "k-", linewidth=2, label="total")
    for role in roles:
        axis.plot(swaps, [s["rss"].get(role, 0) / 2**20 for s in samples], label=role)
    axis.set_xlabel("swaps")
    axis.set_ylabel("RSS (MiB)")
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return figure
