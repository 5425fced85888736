"""Benchmark 3's estimator on made-up token streams (no engine): each swap block is paired
with the quiet blocks either side, so a machine whose speed drifts steadily does not read as a
cost, and the pairs' spread gives the interval."""

from __future__ import annotations

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


def test_a_steady_cost_reads_as_its_ratio_with_an_interval_around_it():
    measured = blocks(7)
    paired = serving._paired([stream(measured, lambda kind, _: 9 if kind == "swaps" else 10)], measured)
    assert paired["pairs"] == 3
    assert paired["throughput"] == pytest.approx(0.9)
    low, high = paired["throughput_ci95"]
    assert low == pytest.approx(0.9) and high == pytest.approx(0.9)
    assert paired["p99_itl"] == pytest.approx(1.0)  # the gaps are alike; only the tokens per chunk differ


def test_a_machine_that_speeds_up_does_not_read_as_a_cost_or_a_gain():
    """Every block at the machine's speed, which rises block by block: each swap block
    against the mean of its neighbours is 1, and so is the interval."""
    measured = blocks(9)
    paired = serving._paired([stream(measured, lambda kind, index: 10 + index)], measured)
    assert paired["throughput_ratios"] == pytest.approx([1.0] * 4)
    assert paired["throughput_ci95"] == pytest.approx([1.0, 1.0])


def test_the_targets_are_judged_on_the_paired_figures():
    measured = blocks(5)
    result = {"paired": serving._paired([stream(measured, lambda kind, _: 97 if kind == "swaps" else 100)], measured)}
    checks = serving.targets(result)
    assert checks["throughput"]["measured"] == pytest.approx(0.97)
    assert not checks["throughput"]["met"]
    assert checks["p99_itl"]["met"]
