"""Benchmark 3's estimator on made-up token streams (no engine): each swap block is paired
with the quiet blocks either side, so a machine whose speed drifts steadily does not read as a
cost, and the pairs' spread gives the interval."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks import serving
from benchmarks.common import Stream

BLOCK = 10.0
CHUNK_S = 0.1


def blocks(count: int) -> list[tuple[str, float, float]]:
    return [("swaps" if i % 2 else "quiet", i * BLOCK, (i + 1) * BLOCK) for i in range(count)]


def stream(measured: list[tuple[str, float, float]], tokens_per_chunk) -> Stream:
    """One chunk every CHUNK_S; ``tokens_per_chunk(kind, index)`` tokens in each."""
    result = Stream(started=0.0)
    for index, (kind, start, end) in enumerate(measured):
        for step in range(round((end - start) / CHUNK_S)):
            result.chunk_times.append(start + step * CHUNK_S)
            result.chunk_tokens.append(tokens_per_chunk(kind, index))
    return result


def paired_figures(load: Stream, measured: list[tuple[str, float, float]]) -> dict:
    return serving._paired([serving._phase([load], [(a, b)]) for _, a, b in measured])


def test_a_steady_cost_reads_as_its_ratio_with_an_interval_around_it():
    measured = blocks(9)
    paired = paired_figures(stream(measured, lambda kind, _: 9 if kind == "swaps" else 10), measured)
    assert paired["pairs"] == 4
    assert paired["throughput"] == pytest.approx(0.9)
    low, high = paired["throughput_ci95"]
    assert low == pytest.approx(0.9) and high == pytest.approx(0.9)
    assert paired["p99_itl"] == pytest.approx(1.0)  # the gaps are alike; only the tokens per chunk differ
    assert paired["p99_itl_ci95"] == pytest.approx([1.0, 1.0])


def test_a_machine_that_speeds_up_does_not_read_as_a_cost_or_a_gain():
    """Every block at the machine's speed, which rises block by block: each swap block
    against the mean of its neighbours is 1, and so is the interval."""
    measured = blocks(9)
    paired = paired_figures(stream(measured, lambda kind, index: 10 + index), measured)
    assert paired["throughput_ratios"] == pytest.approx([1.0] * 4)
    assert paired["throughput_ci95"] == pytest.approx([1.0, 1.0])


def test_neighbouring_pairs_that_move_together_widen_the_interval():
    """Neighbouring pairs share a quiet block, so their ratios move together; the same
    ratios in runs (positively correlated neighbours) give a wider interval than when they
    alternate, where the mean alone would give both the same width."""
    in_runs = np.array([1.0, 1.0, 1.1, 1.1, 1.0, 1.0, 1.1, 1.1])
    alternating = np.array([1.0, 1.1, 1.0, 1.1, 1.0, 1.1, 1.0, 1.1])
    low_runs, high_runs = serving._interval(in_runs)
    low_alt, high_alt = serving._interval(alternating)
    assert (low_runs + high_runs) / 2 == pytest.approx((low_alt + high_alt) / 2) == pytest.approx(1.05)
    assert high_runs - low_runs > high_alt - low_alt


def test_the_targets_are_judged_on_the_paired_figures_and_few_pairs_give_no_interval():
    measured = blocks(5)
    result = {"paired": paired_figures(stream(measured, lambda kind, _: 97 if kind == "swaps" else 100), measured)}
    checks = serving.targets(result)
    assert checks["throughput"]["measured"] == pytest.approx(0.97)
    assert not checks["throughput"]["met"]
    assert checks["p99_itl"]["met"]
    assert checks["throughput"]["ci95"] is None and checks["p99_itl"]["ci95"] is None  # 2 pairs


def test_a_block_without_tokens_is_no_figure_and_no_crash():
    measured = blocks(9)
    stalled = stream(measured, lambda kind, index: 0 if index in (2, 3, 4) else 10)
    stalled.chunk_times, stalled.chunk_tokens = zip(
        *[(t, n) for t, n in zip(stalled.chunk_times, stalled.chunk_tokens) if n]
    )
    checks = serving.targets({"paired": paired_figures(stalled, measured)})
    assert math.isnan(checks["throughput"]["measured"]) and not checks["throughput"]["met"]
    assert math.isnan(checks["p99_itl"]["measured"]) and not checks["p99_itl"]["met"]
    assert checks["throughput"]["ci95"] is None
