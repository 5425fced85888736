"""The demo's results: a table, ``steps.jsonl`` and a PNG plot."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .training import StepRecord

TABLE_ROWS = 12  # the table shows about this many evenly spaced steps (steps.jsonl has them all)


def write_report(out: Path, steps: list[StepRecord], max_staleness: int, console: Console) -> tuple[Path, Path]:
    steps_path = out / "steps.jsonl"
    steps_path.write_text("".join(json.dumps(record.to_json()) + "\n" for record in steps))
    plot_path = out / "reward.png"
    _plot(plot_path, steps, max_staleness)

    # Short headers and fixed-width cells: the table fits 80 columns, terminal or not.
    table = Table(title="GRPO steps (rollouts from the engines)")
    for header in ("step", "reward", "rollout version", "behind", "sync"):
        table.add_column(header, no_wrap=True, justify="left" if header == "rollout version" else "right")
    every = max(1, len(steps) // TABLE_ROWS)
    for record in [s for s in steps if s.step % every == 0 or s is steps[-1]]:
        sync = "-" if record.sync_seconds is None else f"{record.sync_seconds:.2f} s"
        table.add_row(
            str(record.step), f"{record.reward:.2f}", ", ".join(record.rollout_versions), str(record.staleness), sync
        )
    console.print(table)
    syncs = sorted(s.sync_seconds for s in steps if s.sync_seconds is not None)
    if syncs:
        console.print(
            f"sync (publish → served on both engines): median {statistics.median(syncs):.2f} s, "
            f"max {syncs[-1]:.2f} s over {len(syncs)} versions; every step's rollouts on one version, "
            f"at most {max(s.staleness for s in steps)} behind (bound {max_staleness})"
        )
    return steps_path, plot_path


def _plot(path: Path, steps: list[StepRecord], max_staleness: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), dpi=120, sharex=True, height_ratios=(2, 1))
    x = [s.step for s in steps]
    top.plot(x, [s.reward for s in steps], color="tab:blue", marker=".", label="reward of the step's rollouts")
    top.set_ylabel('reward: share of " yes" tokens')
    top.set_ylim(-0.02, 1.02)
    top.set_title(f"GRPO with rollouts from two vLLM engines following the store (max staleness {max_staleness})")
    top.legend(loc="lower right")
    synced = [s for s in steps if s.sync_seconds is not None]
    bottom.bar([s.step for s in synced], [s.sync_seconds for s in synced], color="tab:orange")
    bottom.set_title("sync of the version the step's rollouts used: publish → served on both engines", fontsize=10)
    bottom.set_ylabel("sync (s)")
    bottom.set_xlabel("GRPO step")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
