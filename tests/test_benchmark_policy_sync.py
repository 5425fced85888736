"""The policy-sync benchmark's scheduling and report (no engine): its paths run interleaved, one
step of each in turn, so that a machine whose speed drifts weighs on all of them alike."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from benchmarks.policy_sync import PHASE_ROWS, _phase_table, interleaved


def test_interleaved_runs_one_step_of_each_path_in_turn_and_moves_the_first_along() -> None:
    log: list[str] = []

    def path(name: str, steps: int) -> Generator[None, None, dict[str, Any]]:
        for _ in range(steps):
            log.append(name)
            yield
        return {"name": name, "steps": steps}

    results = interleaved({"a": path("a", 2), "b": path("b", 2), "c": path("c", 3)})
    assert log == ["a", "b", "c", "b", "c", "a", "c"]
    assert results == {"a": {"name": "a", "steps": 2}, "b": {"name": "b", "steps": 2}, "c": {"name": "c", "steps": 3}}


def test_the_phase_table_has_a_row_per_phase_and_a_dash_where_one_was_not_measured() -> None:
    measured = {"trainer_phases_p50": {"save": 0.04}, "phases_p50": {"stage": 0.02, "stage_read": 0.01}}
    table = _phase_table(
        {"ours": measured, "ours_one_engine": measured, "ours_vllm_spin": {**measured, "phases_p50": {}}}
    )
    rows = table[4:]
    assert len(rows) == len(PHASE_ROWS)
    assert rows[0].endswith("| 40.0 | 40.0 | 40.0 |")
    stage = next(row for row in rows if "stage, of which" in row)
    assert stage.endswith("| 20.0 | 20.0 | – |")
    assert sum(row.endswith("| – | – | – |") for row in rows) == len(PHASE_ROWS) - 3


def test_a_phase_only_some_steps_have_is_the_median_of_those_steps() -> None:
    from benchmarks.policy_sync import _medians

    rows = [{"stage": 0.03}, {"stage": 0.01, "built_ahead": 0.02}, {"stage": 0.02, "built_ahead": 0.04}]
    assert _medians(rows) == {"stage": 0.02, "built_ahead": 0.03}


def test_the_ratio_interval_holds_the_ratio_of_medians_and_narrows_with_more_rounds() -> None:
    import random
    import statistics

    from benchmarks.policy_sync import ratio_interval

    draw = random.Random(1)
    ours = [0.18 + draw.gauss(0, 0.02) for _ in range(80)]
    trl = [0.20 + draw.gauss(0, 0.02) for _ in range(80)]
    interval = ratio_interval(ours, trl)
    assert interval is not None
    low, high = interval
    assert low < statistics.median(ours) / statistics.median(trl) < high
    assert ratio_interval(ours, trl) == (low, high)  # the same run gives the same interval
    few = ratio_interval(ours[:20], trl[:20])
    assert few is not None and few[1] - few[0] > high - low
    assert ratio_interval(ours[:10], trl[:10]) is None  # too few rounds for blocks of 5
    with pytest.raises(ValueError, match="do not pair up"):
        ratio_interval(ours, trl[:-1])
