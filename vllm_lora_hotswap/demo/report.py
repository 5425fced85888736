"""The demo's results: a table, a PNG plot and the raw figures."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .sampler import ServedRewardSampler
from .training import TrainingResult


def write_report(out: Path, training: TrainingResult, sampler: ServedRewardSampler, console: Console) -> tuple[Path, Path, Path]:
    t0 = training.started_at
    first_served = {version: at for at, version in sampler.swaps}
    rows = []
    for publication in training.publications:
        version = publication["version"]
        served = [s.reward for s in sampler.samples if s.served_by == version]
        rows.append({
            **publication,
            "served_after_start_s": round(first_served[version] - t0, 1) if version in first_served else None,
            "served_reward": sum(served) / len(served) if served else None,
            "samples": len(served),
        })  # fmt: skip

    table = Table("step", "trainer reward", "step blocked", "served at", "served reward", "samples",
                  title="published versions")  # fmt: skip
    table.add_column("version", no_wrap=True)
    lines = ["| version | step | trainer reward | step blocked | served at | served reward | samples |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        cells = [str(row["step"]), _fmt(row["reward"]), f"{1000 * row['blocked_seconds']:.0f} ms",
                 "-" if row["served_after_start_s"] is None else f"{row['served_after_start_s']:.1f} s",
                 _fmt(row["served_reward"]), str(row["samples"]), row["version"]]  # fmt: skip
        table.add_row(*cells)
        lines.append("| " + " | ".join([cells[-1], *cells[:-1]]) + " |")
    console.print(table)
    table_path = out / "results.md"
    table_path.write_text("\n".join(lines) + "\n")

    plot_path = out / "reward.png"
    _plot(plot_path, training, sampler)
    json_path = out / "results.json"
    json_path.write_text(json.dumps({
        "started_at": t0,
        "trainer": [{"t": t - t0, "step": step, "reward": reward} for t, step, reward in training.logs],
        "served": [{"t": s.at - t0, "served_by": s.served_by, "reward": s.reward} for s in sampler.samples],
        "swaps": [{"t": at - t0, "version": version} for at, version in sampler.swaps],
        "versions": rows,
    }, indent=2))  # fmt: skip
    return table_path, plot_path, json_path


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _plot(path: Path, training: TrainingResult, sampler: ServedRewardSampler) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = training.started_at
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=120)
    ax.plot([t - t0 for t, _, _ in training.logs], [r for _, _, r in training.logs], label="trainer reward (GRPO logs)", color="tab:blue")
    samples = [s for s in sampler.samples if s.at >= t0]
    ax.scatter([s.at - t0 for s in samples], [s.reward for s in samples], s=8, color="tab:orange", alpha=0.5,
               label="served reward (samples from vLLM)")  # fmt: skip
    window = 6
    smooth = [sum(s.reward for s in samples[max(0, i - window + 1) : i + 1]) / len(samples[max(0, i - window + 1) : i + 1])
              for i in range(len(samples))]  # fmt: skip
    ax.plot([s.at - t0 for s in samples], smooth, color="tab:orange", label="served reward (rolling mean)")
    for index, (at, _version) in enumerate(sampler.swaps):
        ax.axvline(at - t0, color="grey", linestyle=":", linewidth=1, label="swap (new version served)" if index == 0 else None)
    ax.set_xlabel("seconds since training started")
    ax.set_ylabel('reward: share of " yes" tokens')
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("GRPO publishes LoRA versions; vLLM serves each within seconds")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
